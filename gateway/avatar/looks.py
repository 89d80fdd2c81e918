"""Selectable looks of the local avatar: the colours of one character.

A look changes only colours (skin, hair, clothes, eyes, lips, backdrop); the
figure's shapes and animation are the same for all. Looks are picked by id,
e.g. ``FaceRenderer(1280, 720, look="ben")``; :data:`LOOKS` lists them in
display order for a picker.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["DEFAULT_LOOK", "LOOKS", "Color", "Look", "get_look"]

Color = tuple[float, float, float]
"""Linear 0..1 RGB as drawn (converted to BT.601 YUV by the renderer)."""

_ID = re.compile(r"[a-z][a-z0-9_-]*")

# Colours every look shares: eye whites, pupils and the inside of the mouth.
SCLERA, PUPIL = (0.99, 0.99, 0.98), (0.06, 0.05, 0.05)
MOUTH_IN, TONGUE, TEETH = (0.36, 0.08, 0.11), (0.88, 0.42, 0.47), (0.99, 0.98, 0.95)


@dataclass(frozen=True, slots=True)
class Look:
    """The colours of one avatar character. All fields but ``id`` and ``title`` are RGB triples."""

    id: str
    """Stable lowercase ASCII key, as passed to ``FaceRenderer(look=...)``."""
    title: str
    """Human-readable name for a picker."""
    skin: Color
    skin_shade: Color
    """Shadowed skin: jaw edge, neck under the chin, nose, inner ears, fringe shadow."""
    outline: Color
    """The cartoon outline around every shape, also the nose and lower-lid strokes."""
    hair: Color
    """Hair base colour, also the eyebrows."""
    hair_highlight: Color
    shirt: Color
    shirt_dark: Color
    """Shirt shading at the sides and the collar band."""
    iris: Color
    iris_light: Color
    """Lower half of the iris, where light falls."""
    iris_dark: Color
    """Iris rim and the shadow of the upper lid."""
    lash: Color
    lip: Color
    lip_dark: Color
    """The lips' seam and the rim of the open mouth."""
    lip_highlight: Color
    blush: Color
    background_top: Color
    background_bottom: Color

    def __post_init__(self) -> None:
        if not _ID.fullmatch(self.id):
            raise ValueError(f"look id must be lowercase ASCII ([a-z][a-z0-9_-]*), got {self.id!r}")
        if not self.title.strip():
            raise ValueError(f"look {self.id!r} needs a title")
        for f in dataclasses.fields(self):
            if f.name in ("id", "title"):
                continue
            c = getattr(self, f.name)
            if len(c) != 3 or not all(0.0 <= v <= 1.0 for v in c):
                raise ValueError(f"look {self.id!r}: {f.name} must be three values in 0..1, got {c!r}")


def _registry(*looks: Look) -> Mapping[str, Look]:
    by_id = {look.id: look for look in looks}
    if len(by_id) != len(looks):
        raise ValueError("duplicate look id")
    return MappingProxyType(by_id)


LOOKS: Mapping[str, Look] = _registry(
    Look(
        id="ada",
        title="Ada",
        skin=(0.97, 0.80, 0.67),
        skin_shade=(0.87, 0.62, 0.50),
        outline=(0.55, 0.33, 0.27),
        hair=(0.31, 0.19, 0.13),
        hair_highlight=(0.52, 0.34, 0.22),
        shirt=(0.20, 0.55, 0.60),
        shirt_dark=(0.12, 0.40, 0.45),
        iris=(0.25, 0.55, 0.50),
        iris_light=(0.45, 0.72, 0.62),
        iris_dark=(0.10, 0.28, 0.27),
        lash=(0.16, 0.09, 0.07),
        lip=(0.85, 0.47, 0.47),
        lip_dark=(0.45, 0.17, 0.18),
        lip_highlight=(1.0, 0.75, 0.72),
        blush=(0.98, 0.52, 0.52),
        background_top=(0.72, 0.84, 0.93),
        background_bottom=(0.93, 0.95, 0.97),
    ),
    Look(
        id="ben",
        title="Ben",
        skin=(0.50, 0.32, 0.22),
        skin_shade=(0.37, 0.23, 0.15),
        outline=(0.19, 0.11, 0.07),
        hair=(0.07, 0.06, 0.06),
        hair_highlight=(0.24, 0.21, 0.20),
        shirt=(0.87, 0.66, 0.18),
        shirt_dark=(0.70, 0.49, 0.10),
        iris=(0.33, 0.20, 0.11),
        iris_light=(0.52, 0.35, 0.19),
        iris_dark=(0.12, 0.07, 0.04),
        lash=(0.05, 0.04, 0.04),
        lip=(0.52, 0.29, 0.26),
        lip_dark=(0.24, 0.10, 0.09),
        lip_highlight=(0.72, 0.50, 0.45),
        blush=(0.58, 0.31, 0.25),
        background_top=(0.78, 0.77, 0.90),
        background_bottom=(0.94, 0.93, 0.97),
    ),
    Look(
        id="cleo",
        title="Cleo",
        skin=(0.86, 0.67, 0.50),
        skin_shade=(0.74, 0.53, 0.38),
        outline=(0.43, 0.26, 0.17),
        hair=(0.52, 0.18, 0.08),
        hair_highlight=(0.78, 0.38, 0.18),
        shirt=(0.48, 0.30, 0.63),
        shirt_dark=(0.34, 0.19, 0.47),
        iris=(0.38, 0.50, 0.25),
        iris_light=(0.60, 0.67, 0.37),
        iris_dark=(0.16, 0.22, 0.10),
        lash=(0.15, 0.07, 0.05),
        lip=(0.77, 0.40, 0.37),
        lip_dark=(0.40, 0.14, 0.12),
        lip_highlight=(0.95, 0.68, 0.60),
        blush=(0.92, 0.47, 0.40),
        background_top=(0.70, 0.80, 0.74),
        background_bottom=(0.91, 0.94, 0.91),
    ),
)
"""Every look by id, in picker order; the first is the default."""

DEFAULT_LOOK = "ada"


def get_look(look_id: str) -> Look:
    """The look named `look_id`; ``ValueError`` listing the valid ids if there is none."""
    try:
        return LOOKS[look_id]
    except (KeyError, TypeError):
        raise ValueError(f"unknown look {look_id!r}; valid looks: {', '.join(LOOKS)}") from None
