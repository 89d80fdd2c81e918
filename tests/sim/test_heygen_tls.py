"""The simulator over TLS: HeyGen's browser SDK reaches the chat socket only at
``wss://<host>/v1/ws/streaming.chat`` (port 443), so the simulator can serve every route on a
TLS port too, with a certificate given by path or self-signed at start."""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509

from gateway.config import ConfigError
from gateway.sim.app import create_sim_app
from gateway.sim.config import SimSettings
from gateway.sim.heygen_proto import TextFrame, encode_frame
from gateway.sim.heygen_tls import self_signed, server_context
from gateway.sim.ledger import Ledger

HEYGEN_KEY = "sim-heygen-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_self_signed_certificate_names_the_hosts_it_serves() -> None:
    pem, key = self_signed(["10.203.0.1", "sim.example", "10.203.0.1", ""])
    certificate = x509.load_pem_x509_certificate(pem)
    names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["sim.example", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.203.0.1"),
                                                          ipaddress.ip_address("127.0.0.1")]
    now = datetime.datetime.now(datetime.UTC)
    assert certificate.not_valid_before_utc < now < certificate.not_valid_after_utc
    assert b"PRIVATE KEY" in key


def test_a_certificate_from_files_and_a_mismatched_key(tmp_path: Path) -> None:
    cert, key = self_signed(["127.0.0.1"])
    _, other_key = self_signed(["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    (tmp_path / "other.pem").write_bytes(other_key)
    (tmp_path / "both.pem").write_bytes(cert + key)
    assert isinstance(server_context(str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")),
                      ssl.SSLContext)
    assert isinstance(server_context(str(tmp_path / "both.pem")), ssl.SSLContext)
    with pytest.raises(ssl.SSLError):
        server_context(str(tmp_path / "cert.pem"), str(tmp_path / "other.pem"))
    with pytest.raises(OSError):
        server_context(str(tmp_path / "missing.pem"))


def test_tls_settings_are_checked() -> None:
    env = {"AVATAR_GATEWAY_SIM_TLS_PORT": "443", "AVATAR_GATEWAY_SIM_TLS_CERT": "/c.pem"}
    settings = SimSettings.from_env(env)
    assert settings.tls_port == 443 and settings.tls_cert == "/c.pem" and settings.tls_key == ""
    assert SimSettings.from_env({}).tls_port == 0
    with pytest.raises(ConfigError, match="tls_port"):
        SimSettings.from_env({}, tls_port=8090)
    with pytest.raises(ConfigError, match="tls_port"):
        SimSettings.from_env({}, tls_port=70000)
    with pytest.raises(ConfigError, match="tls_key needs tls_cert"):
        SimSettings.from_env({}, tls_key="/k.pem")


@pytest.fixture
async def tls_sim(tmp_path: Path) -> AsyncIterator[tuple[str, ssl.SSLContext, Ledger]]:
    """The simulator on https://127.0.0.1:<port>, and a client context that trusts it."""
    cert, key = self_signed(["127.0.0.1"])
    (tmp_path / "cert.pem").write_bytes(cert)
    (tmp_path / "key.pem").write_bytes(key)
    ledger = Ledger(":memory:")
    runner = web.AppRunner(create_sim_app(SimSettings.from_env({}), ledger=ledger))
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_context(
        str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")))
    try:
        await site.start()
        yield f"https://127.0.0.1:{port}", ssl.create_default_context(
            cafile=str(tmp_path / "cert.pem")), ledger
    finally:
        await runner.cleanup()
        ledger.close()


async def test_rest_livekit_url_and_chat_socket_over_tls(
        tls_sim: tuple[str, ssl.SSLContext, Ledger]) -> None:
    base, trust, ledger = tls_sim
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=trust)) as http:
        async def post(action: str, body: object, **headers: str) -> dict[str, object]:
            async with http.post(f"{base}/v1/streaming.{action}", json=body,
                                 headers=headers) as response:
                assert response.status == 200, await response.text()
                data: dict[str, object] = (await response.json())["data"] or {}
                return data

        token = str((await post("create_token", {}, **{"x-api-key": HEYGEN_KEY}))["token"])
        auth = {"Authorization": f"Bearer {token}"}
        data = await post("new", {"version": "v2", "quality": "low"}, **auth)
        session_id = str(data["session_id"])
        # The room is reached the way the API was: over TLS.
        assert data["url"] == base.replace("https://", "wss://")
        await post("start", {"session_id": session_id}, **auth)
        ws = await http.ws_connect(f"{base.replace('https://', 'wss://')}/v1/ws/streaming.chat"
                                   f"?session_id={session_id}&session_token={token}")
        await ws.send_bytes(encode_frame(TextFrame("")))  # answered with an error event
        message = await ws.receive(timeout=30)
        assert json.loads(message.data)["event_type"] == "error"
        await post("stop", {"session_id": session_id}, **auth)
        message = await ws.receive(timeout=30)
        assert message.type is aiohttp.WSMsgType.CLOSE and message.data == 1000
        await ws.close()
    assert not ledger.entries(open_only=True)
    # A client that does not trust the certificate is refused.
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.get(f"{base}/sim/ledger")


def test_cli_sim_serves_tls_with_a_self_signed_certificate() -> None:
    port, tls_port = free_port(), free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "sim", "--port", str(port),
                             "--tls-port", str(tls_port)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ))
    try:
        assert proc.stdout is not None
        text = "".join(proc.stdout.readline() for _ in range(6))
        assert f"https://127.0.0.1:{tls_port}" in text and "self-signed" in text, text
        insecure = ssl.create_default_context()
        insecure.check_hostname = False
        insecure.verify_mode = ssl.CERT_NONE
        deadline = time.monotonic() + 20
        for url, context in ((f"https://127.0.0.1:{tls_port}", insecure),
                             (f"http://127.0.0.1:{port}", None)):
            while True:
                request = urllib.request.Request(url + "/v1/streaming.create_token", data=b"{}",
                                                 headers={"x-api-key": HEYGEN_KEY}, method="POST")
                try:
                    with urllib.request.urlopen(request, timeout=5, context=context) as response:
                        assert json.loads(response.read())["data"]["token"]
                    break
                except OSError:
                    assert time.monotonic() < deadline, f"{url} never answered"
                    time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=20)
        assert proc.returncode == 0, stderr
        assert "Traceback" not in stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_sim_reports_a_bad_certificate() -> None:
    result = subprocess.run([sys.executable, "-m", "gateway", "sim", "--port", str(free_port()),
                             "--tls-port", str(free_port()), "--tls-cert", "/nonexistent.pem"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "TLS" in result.stderr and "Traceback" not in result.stderr
