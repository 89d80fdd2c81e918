"""Process-wide tuning for a long-running media server (the owner and each fan-out worker)."""

from __future__ import annotations

import gc


def freeze_heap() -> None:
    """Move everything alive after start-up out of the cyclic collector's reach.

    Imports and set-up leave ~130 000 tracked objects (aiortc, PyAV, numpy, the livekit
    protocol) that live as long as the process. Every full collection walked them all: ~70 ms
    with the GIL held, two video frames of stall for every viewer. Frozen, they are skipped;
    what the process allocates later is collected as before. Call once, when start-up is done.
    """
    gc.collect()
    gc.freeze()
