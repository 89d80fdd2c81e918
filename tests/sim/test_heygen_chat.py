"""HeyGen's chat socket ``/v1/ws/streaming.chat`` in the simulator: protobuf frames as
``@heygen/streaming-avatar`` 2.0.16 encodes them, talk over the socket, voice chat over the
socket and over the room without ``start_listening`` (real transcripts, offline), bad input,
faults, and the end of the session closing its sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from livekit import rtc

from gateway.avatar import SpeechSynthesizer
from gateway.avatar.stt import RecognizerProcess
from gateway.sim.app import create_sim_app
from gateway.sim.heygen_listen import Listener
from gateway.sim.heygen_proto import (
    AudioFrame,
    ProtoError,
    TextFrame,
    TranscriptionFrame,
    decode_frame,
    encode_frame,
)
from gateway.sim.ledger import Ledger
from tests.sim.fixtures import (
    HEYGEN_KEY,
    SimClient,
    admin,
    heygen,
    ledger_json,
    make_sim_settings,
    needs_netns,
)
from tests.sim.sdk_client import SdkClient

pytestmark = pytest.mark.usefixtures("nothing_left_open")

CHAT = "/v1/ws/streaming.chat"
PHRASE = "one two three four five"
"""PocketSphinx hears eSpeak's rendering of it as "well two three four five" (see
tests/test_local_listening.py)."""

# What protobufjs 7 encodes from the SDK's own descriptor (captured with node from the
# installed @heygen/streaming-avatar 2.0.16): Frame{text{text}}, and Frame{transcription}.
PROTOBUFJS_TEXT = bytes.fromhex("0a111a0f48656c6c6f20c3bc6ec3af636f6465")
PROTOBUFJS_TRANSCRIPTION = bytes.fromhex("1a0c08071a0268692201752a0174")


def words(text: str) -> set[str]:
    return set(text.lower().replace(",", " ").replace(":", " ").split())


# -- the codec --------------------------------------------------------------------------------


def test_codec_reads_and_writes_what_protobufjs_does() -> None:
    assert decode_frame(PROTOBUFJS_TEXT) == TextFrame("Hello ünïcode")
    assert encode_frame(TextFrame("Hello ünïcode")) == PROTOBUFJS_TEXT
    frame = TranscriptionFrame("hi", user_id="u", timestamp="t", id=7)
    assert decode_frame(PROTOBUFJS_TRANSCRIPTION) == frame
    assert encode_frame(frame) == PROTOBUFJS_TRANSCRIPTION
    pcm = bytes(i & 255 for i in range(1024))
    audio = encode_frame(AudioFrame(pcm, 16000, 1))
    # protobufjs: 12 88 08 | 1a 80 08 <1024 bytes> | 20 80 7d | 28 01
    assert audio[:6] == bytes.fromhex("1288081a8008") and audio[-5:] == bytes.fromhex("20807d2801")
    assert decode_frame(audio) == AudioFrame(pcm, 16000, 1)
    assert decode_frame(b"") is None
    # Unknown fields (a newer SDK) are skipped; the last member of the oneof wins.
    assert decode_frame(b"\x20\x05" + PROTOBUFJS_TEXT + b"\x3a\x00") == TextFrame("Hello ünïcode")
    assert decode_frame(PROTOBUFJS_TEXT + PROTOBUFJS_TRANSCRIPTION) == frame


@pytest.mark.parametrize("data", [
    b"\x0a\x05abc",  # truncated member
    b"\x0a",  # truncated length
    b"\x08\x01",  # Frame.text as a varint
    b"\x0a\x03\x1a\x01\xff",  # invalid UTF-8
    b"\x0b\x0c",  # a proto2 group
    b"\x00\x01",  # field number 0
    b"\x0a\x02\x18\x01",  # TextFrame.text as a varint
    b"\x80" * 11,  # endless varint
    b"garbage!",
])
def test_codec_rejects_malformed_bytes(data: bytes) -> None:
    with pytest.raises(ProtoError):
        decode_frame(data)


# -- helpers -----------------------------------------------------------------------------------


async def new_session(sim: SimClient) -> tuple[str, str, dict[str, Any]]:
    """A started session created with a session token, as the SDK does: (id, token, data)."""
    token = (await heygen(sim, "create_token"))["data"]["token"]
    data = (await heygen(sim, "new", {"version": "v2", "quality": "low"}, bearer=token))["data"]
    await heygen(sim, "start", {"session_id": data["session_id"]}, bearer=token)
    return data["session_id"], token, data


async def chat(sim: SimClient, session_id: str, token: str) -> aiohttp.ClientWebSocketResponse:
    return await sim.ws_connect(f"{CHAT}?session_id={session_id}&session_token={token}"
                                f"&silence_response=false")


async def refused(sim: SimClient, query: str, headers: dict[str, str] | None = None) -> int:
    with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
        await sim.ws_connect(CHAT + query, headers=headers)
    return caught.value.status


async def next_event(ws: aiohttp.ClientWebSocketResponse, timeout: float = 30.0) -> dict[str, Any]:
    message = await ws.receive(timeout=timeout)
    assert message.type is aiohttp.WSMsgType.TEXT, message
    event: dict[str, Any] = json.loads(message.data)
    return event


async def closed_with(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    message = await ws.receive(timeout=30.0)
    assert message.type is aiohttp.WSMsgType.CLOSE, message
    # The close frame's code (ws.close_code may say 1006: the server hangs up as soon as it
    # has sent its close frame, before the client's reply gets through).
    return int(message.data), str(message.extra or "")


def heygen_data(client: SdkClient) -> list[dict[str, Any]]:
    return [json.loads(p.payload) for p in client.data if p.sender == "heygen"]


def said(client: SdkClient) -> list[str]:
    """Every utterance the avatar spoke, from its avatar_talking_message chunks."""
    out: dict[str, str] = {}
    for event in heygen_data(client):
        if event["type"] == "avatar_talking_message":
            out[event["task_id"]] = out.get(event["task_id"], "") + event["message"]
    return list(out.values())


@pytest.fixture
def speech() -> np.ndarray[Any, np.dtype[np.int16]]:
    """PHRASE spoken by eSpeak at 48 kHz, between silences."""
    pcm = SpeechSynthesizer("en-us").synthesize(PHRASE).pcm
    silence = np.zeros(48_000, dtype=np.int16)
    return np.concatenate([silence[:24_000], pcm, silence, silence[:24_000]])


def at_16k(pcm: np.ndarray[Any, np.dtype[np.int16]]) -> bytes:
    return pcm[::3].astype("<i2").tobytes()  # eSpeak has nothing above 8 kHz worth keeping


@pytest.fixture
async def client_of(sdk_clients: list[SdkClient]) -> AsyncIterator[Any]:
    async def connect(data: dict[str, Any]) -> SdkClient:
        client = SdkClient(data["url"], data["access_token"])
        sdk_clients.append(client)
        await client.connect()
        return client

    yield connect


# -- authentication ---------------------------------------------------------------------------


async def test_the_socket_takes_the_sessions_own_token(sim: SimClient) -> None:
    session_id, token, _ = await new_session(sim)
    other_id, other_token, _ = await new_session(sim)
    assert await refused(sim, f"?session_token={token}") == 400
    assert await refused(sim, f"?session_id={session_id}") == 401
    assert await refused(sim, f"?session_id={session_id}&session_token=forged") == 401
    assert await refused(sim, f"?session_id={session_id}&session_token={other_token}") == 401
    assert await refused(sim, f"?session_id={session_id}",
                         headers={"x-api-key": "wrong"}) == 401
    status, body = await _http_get(sim, f"{CHAT}?session_id={session_id}&session_token=forged")
    assert status == 401 and body["code"] == 400112 and "session token" in body["message"]
    status, body = await _http_get(sim, f"{CHAT}?session_id=nope", {"x-api-key": HEYGEN_KEY})
    assert status == 400 and body == {"code": 10006, "message": "Session not found"}
    for query, headers in ((f"?session_id={session_id}&session_token={token}", None),
                           (f"?session_id={other_id}", {"x-api-key": HEYGEN_KEY})):
        ws = await sim.ws_connect(CHAT + query, headers=headers)
        await ws.close()
    await heygen(sim, "stop", {"session_id": other_id})
    assert await refused(sim, f"?session_id={other_id}&session_token={other_token}") == 400
    await heygen(sim, "stop", {"session_id": session_id})


async def _http_get(sim: SimClient, path: str,
                    headers: dict[str, str] | None = None) -> tuple[int, Any]:
    response = await sim.get(path, headers=headers)
    return response.status, await response.json()


async def test_sockets_per_session_are_bounded_and_close_with_the_session(sim: SimClient) -> None:
    session_id, token, _ = await new_session(sim)
    sockets = [await chat(sim, session_id, token) for _ in range(4)]
    status, body = await _http_get(sim, f"{CHAT}?session_id={session_id}&session_token={token}")
    assert status == 400 and body["code"] == 10014
    await sockets.pop().close()
    sockets.append(await chat(sim, session_id, token))  # room again
    await heygen(sim, "stop", {"session_id": session_id})
    for ws in sockets:
        code, reason = await closed_with(ws)
        assert code == 1000 and "stopped" in reason
    assert (await ledger_json(sim, "?open=1"))["open"] == 0


# -- talk over the socket ---------------------------------------------------------------------


@needs_netns
async def test_a_text_frame_is_answered_like_talk(sim: SimClient, client_of: Any) -> None:
    session_id, token, data = await new_session(sim)
    client = await client_of(data)
    ws = await chat(sim, session_id, token)
    await ws.send_bytes(PROTOBUFJS_TEXT)  # what the SDK's default speak() sends
    await client.wait_for(lambda: any(e["type"] == "avatar_stop_talking"
                                      for e in heygen_data(client)), timeout=30)
    types = [e["type"] for e in heygen_data(client)]
    assert types[0] == "avatar_start_talking" and types[-1] == "avatar_stop_talking"
    assert "avatar_talking_message" in types and "avatar_end_message" in types
    assert said(client) == ["You said: Hello ünïcode"]
    await ws.send_bytes(encode_frame(TranscriptionFrame("What colour is the sky?")))
    await client.wait_for(lambda: len(said(client)) == 2, timeout=30)
    await ws.close()
    await heygen(sim, "stop", {"session_id": session_id})


# -- bad input --------------------------------------------------------------------------------


@needs_netns
async def test_bad_input_closes_the_socket_not_the_session(sim: SimClient, client_of: Any) -> None:
    session_id, token, data = await new_session(sim)
    client = await client_of(data)
    cases: list[tuple[Any, int, str]] = [
        (b"\xff\xfe garbage", 1007, "not a pipecat.Frame"),
        (b"\x0a\x05abc", 1007, "not a pipecat.Frame"),  # malformed protobuf: truncated
        ("hello", 1003, "binary protobuf"),  # a text message
        (encode_frame(TextFrame("x" * 70_000)), 1009, ""),  # over chat_max_frame_bytes
    ]
    for payload, code, reason in cases:
        ws = await chat(sim, session_id, token)
        await (ws.send_str(payload) if isinstance(payload, str) else ws.send_bytes(payload))
        got_code, got_reason = await closed_with(ws)
        assert got_code == code and reason in got_reason, (payload[:20], got_code, got_reason)
    # Well-formed frames it cannot use: an error event, and the socket stays open.
    ws = await chat(sim, session_id, token)
    for frame, needle in ((TextFrame("   "), "empty"),
                          (TextFrame("y" * 5001), "longer than 5000"),
                          (AudioFrame(b"\x00" * 100, 96_000, 1), "8000..48000"),
                          (AudioFrame(b"\x00" * 101, 16_000, 1), "whole"),
                          (AudioFrame(b"\x00" * 100, 16_000, 3), "1 or 2 channels")):
        await ws.send_bytes(encode_frame(frame))
        event = await next_event(ws)
        assert event["event_type"] == "error" and needle in event["message"], event
    await ws.send_bytes(b"")  # an empty Frame
    assert "none of text" in (await next_event(ws))["message"]
    # The session still works, over this socket and over REST.
    await ws.send_bytes(encode_frame(TextFrame("Still there?")))
    await client.wait_for(lambda: said(client) == ["You said: Still there?"], timeout=30)
    await heygen(sim, "task", {"session_id": session_id, "text": "Yes.", "task_type": "repeat"},
                 bearer=token, timeout=60)
    assert said(client) == ["You said: Still there?", "Yes."]
    await ws.close()
    await heygen(sim, "stop", {"session_id": session_id})


async def test_a_fault_on_the_socket_refuses_it_then_it_works(sim: SimClient) -> None:
    session_id, token, _ = await new_session(sim)
    await admin(sim, "POST", "/sim/faults", {"endpoint": CHAT, "kind": "error", "status": 503,
                                             "times": 1, "session_id": session_id}, expect=201)
    status, body = await _http_get(sim, f"{CHAT}?session_id={session_id}&session_token={token}")
    assert status == 503 and body["code"] == 503
    ws = await chat(sim, session_id, token)
    await ws.close()
    await heygen(sim, "stop", {"session_id": session_id})


# -- voice chat -------------------------------------------------------------------------------


@needs_netns
async def test_voice_chat_over_the_socket_without_start_listening(
        sim: SimClient, client_of: Any, speech: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    session_id, token, data = await new_session(sim)
    client = await client_of(data)
    ws = await chat(sim, session_id, token)
    pcm = at_16k(speech)
    for start in range(0, len(pcm), 1024):  # the SDK's frames: 512 samples, 16 kHz mono
        await ws.send_bytes(encode_frame(AudioFrame(pcm[start:start + 1024], 16000, 1)))
    assert await next_event(ws) == {"event_type": "user_start"}
    assert await next_event(ws) == {"event_type": "user_stop"}
    await client.wait_for(lambda: any(e["type"] == "user_end_message"
                                      for e in heygen_data(client)), timeout=30)
    talking, end = [e for e in heygen_data(client) if e["type"].startswith("user_")]
    assert talking["type"] == "user_talking_message" and end["type"] == "user_end_message"
    assert talking["task_id"] == end["task_id"] and talking["message"] == end["message"]
    assert len(words(talking["message"]) & words(PHRASE)) >= 2, talking
    # The avatar answers the words, as in a real voice chat.
    await client.wait_for(lambda: any(e["type"] == "avatar_stop_talking"
                                      for e in heygen_data(client)), timeout=30)
    assert said(client) == [f"You said: {talking['message']}"]
    # After stop_listening it hears nothing.
    await heygen(sim, "stop_listening", {"session_id": session_id}, bearer=token)
    for start in range(0, len(pcm), 1024):
        await ws.send_bytes(encode_frame(AudioFrame(pcm[start:start + 1024], 16000, 1)))
    await ws.send_bytes(encode_frame(TextFrame("ping")))  # then something that answers
    await client.wait_for(lambda: said(client)[1:] == ["You said: ping"], timeout=30)
    assert sum(e["type"] == "user_end_message" for e in heygen_data(client)) == 1
    await ws.close()
    await heygen(sim, "stop", {"session_id": session_id})


async def speak_into(source: rtc.AudioSource, pcm: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    for start in range(0, len(pcm) - 479, 480):
        await source.capture_frame(rtc.AudioFrame(pcm[start:start + 480].tobytes(), 48_000, 1, 480))


@needs_netns
async def test_voice_chat_into_the_room_without_start_listening(
        sim: SimClient, client_of: Any, speech: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    session_id, token, data = await new_session(sim)
    client = await client_of(data)
    ws = await chat(sim, session_id, token)
    source = await client.publish_microphone()
    await speak_into(source, speech)
    assert await next_event(ws) == {"event_type": "user_start"}
    assert await next_event(ws) == {"event_type": "user_stop"}
    await client.wait_for(lambda: any(e["type"] == "user_end_message"
                                      for e in heygen_data(client)), timeout=30)
    [talking] = [e for e in heygen_data(client) if e["type"] == "user_talking_message"]
    assert len(words(talking["message"]) & words(PHRASE)) >= 2, talking
    # With no chat socket open, voice activity rides LiveKit data (server-side clients).
    await ws.close()
    await client.wait_for(lambda: any(e["type"] == "avatar_stop_talking"
                                      for e in heygen_data(client)), timeout=30)
    await speak_into(source, speech)
    await client.wait_for(lambda: sum(e["type"] == "user_end_message"
                                      for e in heygen_data(client)) == 2, timeout=30)
    types = [e["type"] for e in heygen_data(client)]
    assert "user_start" in types and "user_stop" in types
    await heygen(sim, "stop", {"session_id": session_id})


# -- nothing leaks ----------------------------------------------------------------------------


def children() -> set[int]:
    """Live child processes of this one (the recognizer is one while it runs)."""
    me, out = str(os.getpid()), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[1] == me and fields[0] != "Z":
                out.add(int(stat.parent.name))
    return out


async def test_shutdown_leaves_no_recognizer_task_or_socket(
        speech: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    before = children()
    ledger = Ledger(":memory:")
    app = create_sim_app(make_sim_settings(), ledger=ledger)
    client = TestClient(TestServer(app))
    await client.start_server()
    try:
        session_id, token, _ = await new_session(client)
        ws = await chat(client, session_id, token)
        pcm = at_16k(speech)
        for start in range(0, len(pcm), 1024):
            await ws.send_bytes(encode_frame(AudioFrame(pcm[start:start + 1024], 16000, 1)))
        assert await next_event(ws) == {"event_type": "user_start"}
        assert await next_event(ws) == {"event_type": "user_stop"}
        # A second utterance, still being transcribed when the simulator shuts down.
        for start in range(0, len(pcm), 1024):
            await ws.send_bytes(encode_frame(AudioFrame(pcm[start:start + 1024], 16000, 1)))
        assert await next_event(ws) == {"event_type": "user_start"}
        async with asyncio.timeout(30):
            while not children() - before:  # the recognizer runs
                await asyncio.sleep(0.05)
    finally:
        await client.close()  # shuts the simulator down with the session and socket open
    assert ws.closed
    assert children() - before == set()
    left = [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("sim-")]
    assert left == []
    [row] = ledger.entries()
    assert row.stop_reason == "shutdown"
    ledger.close()


async def test_the_listener_resamples_and_is_deaf_while_the_avatar_speaks(
        speech: np.ndarray[Any, np.dtype[np.int16]]) -> None:
    recognizer = RecognizerProcess()
    voice: list[str] = []
    heard: list[str] = []
    speaking = False
    listener = Listener(recognizer, deaf=lambda: speaking,
                        on_voice=lambda _, kind: voice.append(str(kind)),
                        on_words=lambda _, text: heard.append(text))
    try:
        stereo = np.repeat(speech, 2).astype("<i2").tobytes()  # 48 kHz stereo: resampled
        for start in range(0, len(stereo), 3840):
            listener.hear_pcm("a", stereo[start:start + 3840], 48_000, 2)
        assert voice == ["user_start", "user_stop"]
        async with asyncio.timeout(30):
            while not heard:
                await asyncio.sleep(0.05)
        assert len(words(heard[0]) & words(PHRASE)) >= 2, heard
        # While the avatar speaks, nothing is heard; an utterance in progress ends.
        pcm = at_16k(speech)
        half = len(pcm) // 4 * 2  # whole samples
        listener.hear_pcm("b", pcm[:half], 16_000, 1)
        assert voice[-1] == "user_start"
        speaking = True
        listener.hear_pcm("b", pcm[half:], 16_000, 1)
        assert voice[2:] == ["user_start", "user_stop"]
        listener.hear_pcm("c", pcm, 16_000, 1)
        assert len(voice) == 4
        with pytest.raises(ValueError, match="whole"):
            listener.hear_pcm("a", b"\0" * 3, 16_000, 1)
    finally:
        await listener.close()
        await recognizer.close()
