from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, Secret, Settings


def test_defaults_run_on_a_laptop() -> None:
    settings = Settings.from_env({})
    assert settings.host == "127.0.0.1"
    assert settings.port == 8080
    assert settings.ice_servers == ()
    assert settings.base_url == "http://127.0.0.1:8080"


def test_env_prefix_and_types() -> None:
    settings = Settings.from_env({
        "AVATAR_GATEWAY_PORT": "9000",
        "AVATAR_GATEWAY_KEYFRAME_INTERVAL": "2.5",
        "AVATAR_GATEWAY_ICE_SERVERS": "stun:stun.example.org:3478, turn:turn.example.org",
        "AVATAR_GATEWAY_ICE_HOST_ADDRESSES": "10.0.0.5",
        "AVATAR_GATEWAY_ALLOW_INSECURE": "yes",
        "UNRELATED": "x",
    })
    assert settings.port == 9000
    assert settings.keyframe_interval == 2.5
    assert settings.ice_servers == ("stun:stun.example.org:3478", "turn:turn.example.org")
    assert settings.ice_host_addresses == ("10.0.0.5",)
    assert settings.allow_insecure is True


def test_overrides_win_over_env() -> None:
    settings = Settings.from_env({"AVATAR_GATEWAY_PORT": "9000"}, port=9100)
    assert settings.port == 9100


def test_secrets_are_redacted(tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text("s3cr3t-token\n")
    settings = Settings.from_env({"AVATAR_GATEWAY_API_TOKEN_FILE": str(secret_file)})
    assert settings.api_token.reveal() == "s3cr3t-token"
    assert "s3cr3t" not in repr(settings)
    assert "s3cr3t" not in str(settings.api_token)
    assert repr(Secret("")) == "Secret('')"


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"AVATAR_GATEWAY_PORT": "eighty"}, "AVATAR_GATEWAY_PORT"),
        ({"AVATAR_GATEWAY_PORT": "0"}, "port"),
        ({"AVATAR_GATEWAY_DEFAULT_QUALITY": "ultra"}, "default_quality"),
        ({"AVATAR_GATEWAY_ICE_SERVERS": "http://x"}, "stun:"),
        ({"AVATAR_GATEWAY_ICE_HOST_ADDRESSES": "eth0"}, "not an IP"),
        ({"AVATAR_GATEWAY_AUDIO_PACKET_MS": "30"}, "20, 40 or 60"),
        ({"AVATAR_GATEWAY_FAST_START_FRAMES": "-1"}, "fast_start_frames"),
        ({"AVATAR_GATEWAY_MAX_VIEWER_LOAD": "0"}, "max_viewer_load must be a share"),
        ({"AVATAR_GATEWAY_ALLOW_INSECURE": "maybe"}, "ALLOW_INSECURE"),
        ({"AVATAR_GATEWAY_API_TOKEN_FILE": "/nonexistent/token"}, "cannot read"),
        ({"AVATAR_GATEWAY_DISTRIBUTION": "carrier-pigeon"}, "distribution must be"),
        ({"AVATAR_GATEWAY_DISTRIBUTION": "livekit"}, "needs the operator's LiveKit"),
        ({"AVATAR_GATEWAY_LIVEKIT_URL": "wss://lk.example.org"}, "needs all of"),
        ({"AVATAR_GATEWAY_LIVEKIT_URL": "lk.example.org", "AVATAR_GATEWAY_LIVEKIT_API_KEY": "k",
          "AVATAR_GATEWAY_LIVEKIT_API_SECRET": "s"}, "ws"),
        ({"AVATAR_GATEWAY_REDIS_URL": "localhost:6379"}, "redis://"),
        ({"AVATAR_GATEWAY_REPLICA_LEASE_TTL": "0"}, "replica_lease_ttl must be positive"),
    ],
)
def test_bad_values_are_explained(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        Settings.from_env(env)


def test_public_bind_needs_auth() -> None:
    with pytest.raises(ConfigError, match="without authentication"):
        Settings.from_env({"AVATAR_GATEWAY_HOST": "0.0.0.0"})
    assert Settings.from_env({"AVATAR_GATEWAY_HOST": "0.0.0.0",
                              "AVATAR_GATEWAY_API_TOKEN": "t"}).host == "0.0.0.0"
    assert Settings.from_env({"AVATAR_GATEWAY_HOST": "::1"}).base_url == "http://[::1]:8080"


README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_documented_and_the_readme_table_is_current() -> None:
    import dataclasses

    from gateway.config_reference import END, START, field_docs, reference_markdown

    docs = field_docs()
    assert list(docs) == [f.name for f in dataclasses.fields(Settings)]
    undocumented = [name for name, text in docs.items() if not text]
    assert not undocumented, f"add a docstring under these fields in config.py: {undocumented}"
    table = reference_markdown()
    for f in dataclasses.fields(Settings):
        assert f"`AVATAR_GATEWAY_{f.name.upper()}`" in table
    assert "`AVATAR_GATEWAY_API_TOKEN_FILE`" in table and "`OPENAI_API_KEY`" in table
    readme = README.read_text(encoding="utf-8")
    current = readme[readme.index(START) + len(START) + 1:readme.index(END)]
    assert current == table, "stale: run `avatar-gateway config-reference --update README.md`"


def test_config_reference_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gateway.__main__ import main
    from gateway.config_reference import END, START

    assert main(["config-reference"]) == 0
    assert "| `AVATAR_GATEWAY_LOG_FORMAT` | `text` |" in capsys.readouterr().out
    doc = tmp_path / "doc.md"
    doc.write_text(f"# x\n{START}\nSTALE TABLE\n{END}\ntail\n")
    assert main(["config-reference", "--update", str(doc)]) == 0
    text = doc.read_text()
    assert "STALE TABLE" not in text and "`AVATAR_GATEWAY_HOST`" in text and text.endswith(f"{END}\ntail\n")
    (tmp_path / "plain.md").write_text("no markers\n")
    assert main(["config-reference", "--update", str(tmp_path / "plain.md")]) == 2


def test_json_logs_are_one_object_per_line(capsys: pytest.CaptureFixture[str]) -> None:
    import json
    import logging

    from gateway import logs

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    logs.configure("info", "json")
    try:
        logging.getLogger("gateway.test").info("session %s closed", "abc", extra={"reason": "idle"})
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("gateway.test").exception("it failed")
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
    lines = capsys.readouterr().err.strip().splitlines()
    first, second = (json.loads(line) for line in lines[-2:])
    assert first["message"] == "session abc closed" and first["reason"] == "idle"
    assert first["level"] == "info" and first["logger"] == "gateway.test"
    assert first["time"].endswith("Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exception"]
    with pytest.raises(ConfigError, match="log_format"):
        Settings.from_env({"AVATAR_GATEWAY_LOG_FORMAT": "xml"})


def test_liveavatar_mode_and_the_gateways_own_voice() -> None:
    assert (Settings().liveavatar_mode, Settings().tts) == ("full", "espeak")
    lite = Settings.from_env({"AVATAR_GATEWAY_LIVEAVATAR_MODE": "lite",
                              "AVATAR_GATEWAY_TTS": "openai", "OPENAI_API_KEY": "sk-x",
                              "AVATAR_GATEWAY_OPENAI_TTS_VOICE": "nova"})
    assert (lite.liveavatar_mode, lite.tts, lite.openai_tts_voice) == ("lite", "openai", "nova")
    with pytest.raises(ConfigError, match="liveavatar_mode must be 'full' or 'lite'"):
        Settings(liveavatar_mode="LITE-ish")
    with pytest.raises(ConfigError, match="tts must be 'espeak' or 'openai'"):
        Settings(tts="festival")
    # OpenAI's voice without a key would fail at the first word: refuse it at start instead.
    with pytest.raises(ConfigError, match="tts=openai needs an OpenAI key"):
        Settings(tts="openai")
