"""`avatar-gateway serve` as a user runs it: prints the page URL, serves, drains on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(method: str, url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.status, json.loads(response.read() or b"null")


def serve(port: int, **env: str) -> subprocess.Popen[str]:
    """`python -m gateway serve --port PORT` with these AVATAR_GATEWAY_* variables."""
    variables = {f"AVATAR_GATEWAY_{name.upper()}": value for name, value in env.items()}
    return subprocess.Popen([sys.executable, "-m", "gateway", "serve", "--port", str(port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **variables})


def test_serve_prints_url_and_drains_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    proc = serve(port, default_quality="low", state_dir=str(tmp_path))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/" in line
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                assert call("GET", base + "/livez")[0] == 200
                break
            except OSError:
                assert time.monotonic() < deadline, "the gateway never answered"
                time.sleep(0.1)
        status, created = call("POST", base + "/v1/sessions", {"upstream": "local"})
        assert status == 201 and created["state"] == "live"
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
        assert f"session {created['id']} closed (shutdown)" in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_bad_configuration_is_refused_with_a_message() -> None:
    env = {**os.environ, "AVATAR_GATEWAY_HOST": "0.0.0.0"}
    result = subprocess.run([sys.executable, "-m", "gateway", "serve"], env=env,
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    assert "without authentication" in result.stderr


def test_an_open_public_bind_warns_at_every_start(tmp_path: Path) -> None:
    # Explicitly allowed, but never silent: the warning is the first thing in the log.
    proc = serve(free_port(), host="0.0.0.0", allow_insecure="1", state_dir=str(tmp_path))
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "WITHOUT authentication" in line and "0.0.0.0" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=20)
