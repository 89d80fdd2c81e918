"""The secrets scan itself (``pytest_sessionfinish`` in ``conftest.py``) runs after every test,
in any order; this checks that it finds what it looks for."""

from __future__ import annotations

from .conftest import KNOWN_SECRETS, WEB, find_secrets


def test_the_scan_finds_every_known_secret_and_nothing_else() -> None:
    for secret in KNOWN_SECRETS:
        line = f"INFO gateway.upstream: created session with key {secret}"
        assert find_secrets(["INFO gateway: nothing here", line]) == [(secret, line)]
    assert find_secrets(["POST /v1/sessions -> 201 {'Content-Type': 'application/json'}"]) == []


def test_the_scan_sees_the_pages() -> None:
    assert any(p.is_file() for p in WEB.rglob("*.html"))
