"""LiveKit's own LiveAvatar client, ``livekit-plugins-liveavatar`` 1.8.9, against the simulator.

The plugin's ``livekit-agents`` 1.8.9 pins ``livekit==1.1.21`` while we pin 1.2.0, so pip
cannot install it next to our dependencies. It is installed (pinned) into
``.cache/pypi/livekit-plugins-liveavatar-1.8.9/`` on first use and driven in a child
interpreter that sees only that directory (:mod:`tests.sim.liveavatar_plugin_client`).

The install needs the package index: inside the test namespace (no network) a missing
install skips the test, saying how to install it (``python -m tests.sim.test_liveavatar_plugin``
outside the namespace); with ``CI=true`` it fails instead.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gateway.sim.config import SimSettings
from tests.conftest import IN_NETNS
from tests.sim.fixtures import SimClient, ledger_json

pytestmark = pytest.mark.usefixtures("nothing_left_open")

ROOT = Path(__file__).resolve().parent.parent.parent
PACKAGE = "livekit-plugins-liveavatar==1.8.9"
TARGET = ROOT / ".cache" / "pypi" / "livekit-plugins-liveavatar-1.8.9"
CLIENT = Path(__file__).resolve().parent / "liveavatar_plugin_client.py"


class PluginUnavailable(RuntimeError):
    pass


def install() -> Path:
    """The plugin's isolated directory, installed with pip on first use."""
    if (TARGET / ".installed").exists():
        return TARGET
    staging = TARGET.with_name(TARGET.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
         "--no-compile", "--target", str(staging), PACKAGE],
        capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        raise PluginUnavailable(f"pip could not install {PACKAGE}: "
                                f"{done.stderr.strip()[-1500:]}")
    shutil.rmtree(TARGET, ignore_errors=True)
    staging.rename(TARGET)
    (TARGET / ".installed").touch()
    return TARGET


@pytest.fixture(scope="module")
def plugin_path() -> Path:
    try:
        return install()
    except PluginUnavailable as exc:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"{exc} (no network inside the test namespace? run "
                    f"'.venv/bin/python -m tests.sim.test_liveavatar_plugin' once outside it)")


async def run_plugin(plugin: Path, sim: SimClient, settings: SimSettings, room: str, *,
                     media: bool) -> dict[str, Any]:
    base = f"http://127.0.0.1:{sim.port}"
    args = [sys.executable, "-S", str(CLIENT), "--api-url", f"{base}/v1/sessions",
            "--api-key", settings.liveavatar_api_key.reveal(),
            "--livekit-url", f"ws://127.0.0.1:{sim.port}", "--livekit-key", settings.livekit_api_key,
            "--livekit-secret", settings.livekit_api_secret.reveal(), "--room", room]
    if media:
        args.append("--media")
    # -S and this PYTHONPATH: the child sees the plugin's dependency tree, never our venv's.
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(plugin),
           "PYTHONNOUSERSITE": "1", "HOME": os.environ.get("HOME", "/tmp")}
    child = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=env,
        cwd=str(ROOT))
    try:
        async with asyncio.timeout(120):
            out, err = await child.communicate()
    except TimeoutError:
        child.kill()
        await child.wait()
        raise
    # What it printed says whether it failed in its work or after it (stdout is its result).
    assert child.returncode == 0, (f"exit {child.returncode}, {len(out)} bytes of result; "
                                   f"{err.decode()[-4000:]}")
    result: dict[str, Any] = json.loads(out)
    return result


async def test_the_plugins_api_client_creates_starts_and_stops_a_lite_session(
        plugin_path: Path, sim: SimClient, sim_settings: SimSettings) -> None:
    seen = await run_plugin(plugin_path, sim, sim_settings, "agent-room", media=IN_NETNS)
    assert seen["plugin_version"] == "1.8.9"
    created, started = seen["created"], seen["started"]
    assert created["code"] == 1000 and set(created["data"]) == {"session_id", "session_token"}
    session_id = created["data"]["session_id"]
    data = started["data"]
    assert started["code"] == 1000 and data["session_id"] == session_id
    assert data["ws_url"].startswith(f"ws://127.0.0.1:{sim.port}/v1/sessions/ws?")
    assert seen["stopped"] == seen["stopped_again"] == {"code": 1000, "data": None,
                                                       "message": "success"}
    [row] = (await ledger_json(sim))["sessions"]
    assert row["session_id"] == session_id and row["mode"] == "LITE"
    assert row["quality"] == "low" and row["stop_reason"] == "stopped"
    assert (await ledger_json(sim))["open"] == 0
    if not IN_NETNS:
        return
    # The avatar joined the agent's own room (livekit_config) with the plugin's identity.
    assert seen["participants"] == ["liveavatar-avatar-agent"]
    assert len(seen["avatar_kinds"]) == 2
    kinds = [e["type"] for e in seen["events"]]
    assert kinds[0] == "session.state_updated" and seen["events"][0]["state"] == "connected"
    for expected in ("agent.audio_buffer_appended", "agent.audio_buffer_committed",
                     "agent.speak_started", "agent.speak_ended"):
        assert expected in kinds, kinds
    assert kinds.index("agent.speak_started") < kinds.index("agent.speak_ended")
    assert "error" not in kinds


async def test_another_livekit_is_refused_clearly(sim: SimClient) -> None:
    from livekit import api

    foreign = (api.AccessToken("other-key", "other-secret-at-least-32-characters!!")
               .with_identity("liveavatar-avatar-agent")
               .with_grants(api.VideoGrants(room_join=True, room="r")).to_jwt())
    response = await sim.post("/v1/sessions/token", headers={"X-API-KEY": "sim-liveavatar-key"},
                              json={"mode": "LITE", "avatar_id": "a", "livekit_config": {
                                  "livekit_url": "wss://example.livekit.cloud",
                                  "livekit_room": "r", "livekit_client_token": foreign}})
    assert response.status == 422
    [detail] = (await response.json())["detail"]
    assert detail["loc"] == ["body", "livekit_config", "livekit_client_token"]
    assert "only this simulator's own LiveKit server is emulated" in detail["msg"]


if __name__ == "__main__":
    print(install())
