"""The avatar's figure as a parametric scene: implicit shapes drawn anti-aliased in float RGB.

Everything here runs once per (size, look) when :mod:`~gateway.avatar.renderer` builds its
assets, never per frame. A :class:`Region` is a window onto the figure at one scale; a
:class:`Pose` holds what varies (blink, gaze, mouth opening and width, which also drops the
jaw); ``draw_figure`` paints everything but the eyes and the mouth, ``draw_eye`` and
``draw_mouth`` paint those.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from .looks import MOUTH_IN, PUPIL, SCLERA, TEETH, TONGUE, Color, Look

F32 = npt.NDArray[np.float32]
Shape = Callable[[F32, F32], F32]
Box = tuple[float, float, float, float]  # x0, y0, x1, y1 in figure units

# Figure units: 1.0 = frame height; x = 0 is the frame centre, y = 0 its top.
HEAD_CY, HEAD_RX, HEAD_RY_TOP, HEAD_RY_BOT = 0.42, 0.182, 0.232, 0.222
HAIR_CY = 0.40
JAW_DROP = 0.014  # chin travel at full mouth opening
EYE_DX, EYE_CY, EYE_RX, EYE_RY = 0.073, 0.432, 0.036, 0.040
MOUTH_CY = 0.572
# Patch regions: everything a parameter can change must lie inside them.
EYE_PATCH: Box = (-0.056, 0.374, 0.056, 0.484)  # relative x, absolute y
MOUTH_PATCH: Box = (-0.118, 0.532, 0.118, 0.75)



def _f(a: npt.ArrayLike) -> F32:
    """float32 view of a numpy result (no copy when it already is one)."""
    return np.asarray(a, dtype=np.float32)


def _smoothstep(e0: float, e1: float, x: npt.ArrayLike) -> F32:
    t = np.clip((_f(x) - e0) / (e1 - e0), 0.0, 1.0)
    return _f(t * t * (3.0 - 2.0 * t))


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> Shape:
    def f(x: F32, y: F32) -> F32:
        return _f(np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2) - 1.0)

    return f


def _mix(a: Color | F32, b: Color, t: F32) -> F32:
    a_ = np.asarray(a, dtype=np.float32)
    b_ = np.asarray(b, dtype=np.float32)
    return (a_ + (b_ - a_) * t[..., None]).astype(np.float32)


class Region:
    """A rectangle of the canvas being painted, in float RGB, in the colours of `look`."""

    def __init__(self, look: Look, scale: float, cx: float, top: float, x0: int, y0: int, w: int, h: int):
        self.look = look
        self.scale = scale
        self.xs = ((np.arange(x0, x0 + w) + 0.5 - cx) / scale).astype(np.float32)
        self.ys = ((np.arange(y0, y0 + h) + 0.5 - top) / scale).astype(np.float32)
        self.rgb = np.zeros((h, w, 3), dtype=np.float32)

    def paint(
        self,
        box: Box,
        shape: Shape,
        color: Color | Callable[[F32, F32], F32],
        *,
        opacity: float = 1.0,
        soft: float = 1.0,
        grow: float = 0.0,
        clip: Shape | None = None,
    ) -> None:
        """Fill `shape` (negative inside) over `box`, anti-aliased over `soft` px."""
        ix = np.searchsorted(self.xs, (box[0], box[2]))
        iy = np.searchsorted(self.ys, (box[1], box[3]))
        if ix[1] - ix[0] < 2 or iy[1] - iy[0] < 2:
            return
        sx, sy = slice(int(ix[0]), int(ix[1])), slice(int(iy[0]), int(iy[1]))
        x = self.xs[sx][None, :]
        y = self.ys[sy][:, None]
        full = (iy[1] - iy[0], ix[1] - ix[0])
        alpha = self._coverage(np.broadcast_to(shape(x, y), full), soft, grow) * opacity
        if clip is not None:
            alpha *= self._coverage(np.broadcast_to(clip(x, y), full), 1.0, 0.0)
        col = color(x, y) if callable(color) else np.asarray(color, dtype=np.float32)
        dst = self.rgb[sy, sx]
        dst += (col - dst) * alpha[..., None]

    def outlined(self, box: Box, shape: Shape, color: Color | Callable[[F32, F32], F32],
                 clip: Shape | None = None) -> None:
        """A cartoon outline (the shape grown by ~2 px at 720p) under the fill."""
        self.paint(box, shape, self.look.outline, grow=0.003, clip=clip)
        self.paint(box, shape, color)

    def _coverage(self, f: F32, soft: float, grow: float) -> F32:
        # Distance in pixels from the implicit value and its numeric gradient.
        gy, gx = np.gradient(f.astype(np.float32))
        d = f / np.maximum(np.hypot(gx, gy), 1e-9) - grow * self.scale
        return _f(np.clip(0.5 - d / soft, 0.0, 1.0))


@dataclass(frozen=True, slots=True)
class Pose:
    blink: float = 0.0
    gaze: tuple[float, float] = (0.0, 0.0)
    mouth_open: float = 0.0
    mouth_width: float = 0.5


def _head_shape(jaw: float) -> Shape:
    def f(x: F32, y: F32) -> F32:
        dy = y - HEAD_CY
        below = np.clip(dy / HEAD_RY_BOT, 0.0, 1.0)
        rx = HEAD_RX * (1.0 - 0.2 * below * below)  # taper toward the chin
        ry_bot = HEAD_RY_BOT + JAW_DROP * jaw * _smoothstep(0.60, 0.66, y)
        ry = np.where(dy < 0, np.float32(HEAD_RY_TOP), ry_bot)
        return _f(np.sqrt((x / rx) ** 2 + (dy / ry) ** 2) - 1.0)

    return f


def _hairline(x: F32) -> F32:
    # Side-swept fringe: a dip right of centre, a parting on the left.
    return _f(
        0.262
        + 0.11 * (x / 0.19) ** 2
        + 0.042 * np.exp(-(((x - 0.055) / 0.075) ** 2))
        - 0.012 * np.exp(-(((x + 0.075) / 0.03) ** 2))
    )


def _torso(x: F32, y: F32) -> F32:
    # Sloping trapezius to the shoulder, a rounded corner, then the arms.
    ax = np.abs(x)
    top = 0.725 + 0.10 * (ax / 0.34) ** 2 - y
    side = ax - 0.405 - 0.03 * _smoothstep(0.85, 1.1, y)
    k = np.float32(0.07)
    return _f(0.5 * (top + side + np.sqrt((top - side) ** 2 + k * k)))


def _hair_back(x: F32, y: F32) -> F32:
    # Elliptic crown, boxier below so the bob ends in rounded corners.
    dy = y - HAIR_CY
    n = np.where(dy < 0, np.float32(2.0), np.float32(4.0))
    ry = np.where(dy < 0, np.float32(0.245), np.float32(0.175))
    return _f(((np.abs(x) / 0.212) ** 2 + (np.abs(dy) / ry) ** n) ** 0.5 - 1.0)


def _hair_front(x: F32, y: F32) -> F32:
    return _f(np.maximum(_hair_back(x, y), (y - _hairline(x)) * 6.0))


def draw_figure(r: Region, p: Pose) -> None:
    """Everything except eyes and mouth; the jaw follows the mouth opening."""
    lk = r.look
    chin = HEAD_CY + HEAD_RY_BOT + JAW_DROP * p.mouth_open
    r.rgb[:] = _mix(lk.background_top, lk.background_bottom,
                    np.broadcast_to(_smoothstep(-0.1, 1.1, r.ys)[:, None], r.rgb.shape[:2]))
    glow = np.exp(-((r.xs[None, :] / 0.42) ** 2 + ((r.ys[:, None] - 0.45) / 0.5) ** 2))
    r.rgb += (np.float32(1.0) - r.rgb) * (0.55 * glow)[..., None].astype(np.float32)

    def hair_color(x: F32, y: F32) -> F32:
        rr = _ellipse(-0.02, HAIR_CY, 0.2, 0.25)(x, y) + 1.0
        hi = np.exp(-(((rr - 0.80) / 0.06) ** 2)) * _smoothstep(0.33, 0.2, y)
        # Faint strands: stripes that fan out from the parting.
        ang = np.arctan2(y - 0.12, x + 0.06)
        strands = 0.5 + 0.5 * np.sin(ang * 60.0)
        return _mix(lk.hair, lk.hair_highlight, 0.75 * hi + 0.12 * strands * _smoothstep(0.2, 0.3, y))

    # Hair behind the head, showing at the sides.
    r.outlined((-0.26, 0.12, 0.26, 0.62), _hair_back, hair_color)

    def neck(x: F32, y: F32) -> F32:
        hw = 0.071 + 0.02 * _smoothstep(0.69, 0.79, y)
        return _f(np.maximum(np.abs(x) - hw, (0.55 - y) * 0.3))

    def neck_color(x: F32, y: F32) -> F32:
        shade = 0.85 * (1.0 - _smoothstep(chin - 0.01, chin + 0.055, y))
        shade = np.maximum(shade, 0.6 * _smoothstep(0.03, 0.075, np.abs(x)))
        return _mix(lk.skin, lk.skin_shade, np.broadcast_to(shade, np.broadcast_shapes(x.shape, y.shape)))

    r.outlined((-0.12, 0.5, 0.12, 1.1), neck, neck_color)
    neckline = _ellipse(0.0, 0.722, 0.094, 0.05)
    collar = _ellipse(0.0, 0.724, 0.11, 0.064)

    def torso(x: F32, y: F32) -> F32:
        return _f(np.maximum(_torso(x, y), -neckline(x, y) * 0.05))

    def shirt_color(x: F32, y: F32) -> F32:
        t = 0.85 * _smoothstep(0.25, 0.55, np.abs(x)) + 0.25 * _smoothstep(0.79, 0.73, y)
        return _mix(lk.shirt, lk.shirt_dark, t)

    body_box = (-0.6, 0.7, 0.6, 1.2)
    r.outlined(body_box, torso, shirt_color)
    r.paint(body_box, lambda x, y: np.maximum(collar(x, y), -neckline(x, y)), lk.shirt_dark,
            clip=_torso)
    # Ears, then the head over them.
    for s in (-1.0, 1.0):
        ear_box = (s * 0.176 - 0.05, 0.38, s * 0.176 + 0.05, 0.51)
        r.outlined(ear_box, _ellipse(s * 0.176, 0.447, 0.031, 0.05), lk.skin)
        r.paint(ear_box, _ellipse(s * 0.181, 0.45, 0.014, 0.029), lk.skin_shade, soft=2.5, opacity=0.8)
    head = _head_shape(p.mouth_open)

    def skin(x: F32, y: F32) -> F32:
        rr = head(x, y) + 1.0
        shade = 0.55 * _smoothstep(0.62, 1.02, rr) + 0.25 * _smoothstep(0.0, 0.25, x * 0.6 + 0.02)
        return _mix(lk.skin, lk.skin_shade, np.clip(shade, 0.0, 1.0))

    head_box = (-0.21, 0.17, 0.21, 0.69)
    r.outlined(head_box, head, skin)
    # Cheeks, nose.
    for s in (-1.0, 1.0):
        r.paint((s * 0.115 - 0.07, 0.47, s * 0.115 + 0.07, 0.56),
                _ellipse(s * 0.115, 0.515, 0.042, 0.026), lk.blush, soft=14.0, opacity=0.45)
    r.paint((-0.05, 0.46, 0.05, 0.54), _ellipse(0.004, 0.503, 0.022, 0.016), lk.skin_shade,
            soft=5.0, opacity=0.7)
    r.paint((-0.05, 0.46, 0.05, 0.54), _ellipse(-0.004, 0.497, 0.012, 0.009), lk.skin,
            soft=4.0, opacity=0.8)
    r.paint((-0.05, 0.46, 0.05, 0.54),
            lambda x, y: np.maximum(np.abs(y - 0.5125 + 0.004 * (1 - (x / 0.013) ** 2)) - 0.0012,
                                    np.abs(x) - 0.013),
            lk.outline, soft=1.6, opacity=0.5)
    # Shadow of the fringe on the forehead, then the fringe.
    r.paint(head_box, lambda x, y: _hair_front(x, y - 0.012), lk.skin_shade, soft=8.0,
            opacity=0.55, clip=head)
    r.outlined((-0.26, 0.12, 0.26, 0.46), _hair_front, hair_color, clip=head)
    # Eyebrows: tapered arcs.
    for s in (-1.0, 1.0):
        cx = s * EYE_DX

        def brow(x: F32, y: F32, cx: float = cx, s: float = s) -> F32:
            u = np.clip((x - cx) / 0.036, -1.0, 1.0)
            centre = 0.347 - 0.011 * (1 - u * u) - 0.003 * s * u
            half = 0.0052 * (1.0 - 0.45 * (s * u + 1) / 2) * np.sqrt(1 - 0.7 * u * u)
            return _f(np.maximum(np.abs(y - centre) - half, np.abs(x - cx) - 0.036))

        r.paint((cx - 0.05, 0.31, cx + 0.05, 0.37), brow, lk.hair, soft=1.2)


def draw_eye(r: Region, cx: float, p: Pose) -> None:
    lk, cy = r.look, EYE_CY

    def edges(x: F32) -> tuple[F32, F32]:
        u = np.clip((x - cx) / EYE_RX, -1.0, 1.0)
        half = EYE_RY * np.sqrt(1.0 - u * u)
        return cy - half, cy + half * 0.92

    lid_level = 0.13 + 0.87 * p.blink  # relaxed lids cover the iris top a little

    def lid(x: F32) -> F32:
        top, bot = edges(x)
        return top + (bot - top) * lid_level

    sclera = _ellipse(cx, cy, EYE_RX, EYE_RY)

    def opening(x: F32, y: F32) -> F32:
        return _f(np.maximum(sclera(x, y), (lid(x) - y) * 30.0))

    box = (cx - 0.055, EYE_PATCH[1], cx + 0.055, EYE_PATCH[3])
    if lid_level < 0.995:
        r.paint(box, opening, lambda x, y: _mix(SCLERA, (0.80, 0.80, 0.86),
                                                 _smoothstep(0.012, 0.0, y - lid(x))))
        gx, gy = cx + p.gaze[0], cy + p.gaze[1] + 0.002

        def iris_color(x: F32, y: F32) -> F32:
            rr = np.sqrt((x - gx) ** 2 + (y - gy) ** 2) / 0.0235
            base = _mix(lk.iris, lk.iris_light, _smoothstep(-0.2, 1.0, y - gy))
            ring = _smoothstep(0.7, 1.0, rr)
            top = _smoothstep(0.008, -0.002, y - lid(x)) * 0.6
            return _mix(base, lk.iris_dark, np.clip(ring + top, 0.0, 1.0))

        r.paint(box, _ellipse(gx, gy, 0.0235, 0.0235), iris_color, clip=opening)
        r.paint(box, _ellipse(gx, gy, 0.0115, 0.0115), PUPIL, clip=opening)
        r.paint(box, _ellipse(gx - 0.0085, gy - 0.0085, 0.0062, 0.0058), (1.0, 1.0, 1.0),
                clip=opening)
        r.paint(box, _ellipse(gx + 0.007, gy + 0.008, 0.0028, 0.0028), (1.0, 1.0, 1.0),
                clip=opening, opacity=0.9)
        # Lower lid line.
        r.paint(box, lambda x, y: np.maximum(np.abs(y - edges(x)[1]) - 0.0009,
                                             np.abs(x - cx) - EYE_RX * 0.85), lk.outline,
                opacity=0.45)
    side = 1.0 if cx > 0 else -1.0

    def lash(x: F32, y: F32) -> F32:
        u = np.clip((x - cx) / EYE_RX, -1.0, 1.0)
        outer = (side * u + 1.0) / 2.0  # 0 at the inner corner, 1 at the outer
        thick = (0.0022 + 0.0042 * outer**1.5) * np.minimum(1.0, outer * 6.0 + 0.2)
        line = np.abs(y - (lid(x) - thick * 0.55)) - thick * 0.6
        # Both ends stop short of the corners, where the lid edge turns vertical
        # (the outer end only when the lid is down: then it reads as a stray tick).
        outer_end, inner_end = 1.03 - 0.13 * p.blink, 0.92
        shift = side * (outer_end - inner_end) / 2 * EYE_RX
        return _f(np.maximum(line, np.abs(x - cx - shift) - EYE_RX * (outer_end + inner_end) / 2))

    r.paint(box, lash, lk.lash, soft=1.1)


def draw_mouth(r: Region, p: Pose) -> None:
    lk = r.look
    o, w = p.mouth_open, p.mouth_width
    hw = (0.034 + 0.028 * w) * (1.0 - 0.15 * o)
    gap = 0.074 * o
    up, down = 0.28 * gap, 0.72 * gap
    smile = 0.010 * (0.6 + 0.4 * w) * (1.0 - 0.6 * o)
    top_pow = 0.5 + 0.5 * w  # wider mouths have flatter upper edges
    cy = MOUTH_CY

    def u2(x: F32) -> F32:
        return _f(np.clip(x / hw, -1.0, 1.0) ** 2)

    def mid(x: F32) -> F32:
        return cy - smile * u2(x)

    def top(x: F32) -> F32:
        return mid(x) - up * (1.0 - u2(x)) ** top_pow

    def bot(x: F32) -> F32:
        return mid(x) + down * (1.0 - u2(x)) ** 0.55

    def opening(x: F32, y: F32) -> F32:
        return _f(np.maximum(np.maximum(np.abs(x) - hw, top(x) - y), y - bot(x)))

    lip_up = 0.0085 * (1.25 - 0.5 * w)
    lip_dn = 0.0125 * (1.25 - 0.5 * w)

    def lips(x: F32, y: F32) -> F32:
        taper = np.sqrt(1.0 - u2(x) * 0.93)
        upper = top(x) - lip_up * taper - y
        return _f(np.maximum(np.maximum(np.abs(x) - hw * 1.04, upper), y - bot(x) - lip_dn * taper))

    box = (-0.11, 0.53, 0.11, 0.67)
    r.paint(box, lips, lk.lip, soft=2.0, opacity=0.85)
    r.paint(box, _ellipse(0.0, bot(np.zeros(1, np.float32))[0] + lip_dn * 0.45,
                          hw * 0.45, lip_dn * 0.3), lk.lip_highlight, soft=4.0, opacity=0.4)
    if gap * r.scale > 1.0:
        r.paint(box, opening, lk.lip_dark, grow=0.0018)
        r.paint(box, opening, lambda x, y: _mix(MOUTH_IN, (0.18, 0.03, 0.05),
                                                  _smoothstep(0.02, 0.0, y - top(x))))
        bottom_mid = cy + down
        r.paint(box, _ellipse(0.0, bottom_mid + 0.25 * gap * 0.2, hw * 0.62, 0.45 * gap + 1e-4),
                TONGUE, clip=opening)
        teeth = min(0.0105, 0.42 * gap)
        r.paint(box, lambda x, y: y - (top(x) + teeth * (1 - u2(x) * 0.5)),
                lambda x, y: _mix(TEETH, (0.85, 0.83, 0.82), _smoothstep(0.0, 0.06, np.abs(x))),
                clip=opening)
    # Seam line: the closed-mouth stroke, fading out as the lips part.
    seam = max(0.0, 1.0 - gap * r.scale / 3.0)
    if seam > 0.0:
        r.paint(box, lambda x, y: np.maximum(np.abs(y - mid(x)) - 0.0016, np.abs(x) - hw),
                lk.lip_dark, opacity=seam)
    for s in (-1.0, 1.0):  # corner dimples make the resting face read as a smile
        r.paint(box, _ellipse(s * hw * 1.06, cy - smile - 0.002, 0.004, 0.005), lk.skin_shade,
                soft=3.0, opacity=0.7)
