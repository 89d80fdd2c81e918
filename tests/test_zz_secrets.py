"""Last in the run (by name): no key or configured token in anything the gateway emitted.

``conftest.py`` records every log record of the run and every response a test client read;
the pages are scanned as served. Run alone, this test scans only what ran before it.
"""

from __future__ import annotations

from pathlib import Path

from .conftest import EMITTED, KNOWN_SECRETS

WEB = Path(__file__).resolve().parent.parent / "web"


def test_no_secret_in_anything_the_gateway_emitted() -> None:
    pages = [p.read_text(encoding="utf-8") for p in WEB.rglob("*") if p.is_file()]
    leaks = sorted({(secret, text[:200]) for text in (*EMITTED, *pages)
                    for secret in KNOWN_SECRETS if secret in text})
    assert not leaks, leaks
    # The scan saw something: a run of only this file has the pages, a full run far more.
    assert pages and all(isinstance(text, str) for text in EMITTED)
