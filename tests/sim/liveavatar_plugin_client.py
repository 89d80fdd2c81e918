"""LiveKit's ``livekit-plugins-liveavatar`` 1.8.9 against the simulator, in its own interpreter.

The plugin needs ``livekit-agents`` 1.8.9, which pins ``livekit==1.1.21`` (ours is 1.2.0), so
it cannot live in our venv: ``tests/sim/test_liveavatar_plugin.py`` installs it into
``.cache/pypi/`` and runs this script with only that directory on the path (``python -S``).
Nothing here imports the gateway.

What it does, as a LiveKit agent job using the plugin does (``avatar.py``,
``AvatarSession.start`` and ``_main_task``):

1. join the room as the agent (the job's participant);
2. mint the avatar's token exactly like the plugin (kind ``agent``, identity
   ``liveavatar-avatar-agent``, ``lk.publish_on_behalf`` = the agent);
3. the plugin's OWN ``LiveAvatarAPI``: ``create_streaming_session`` (LITE + ``livekit_config``),
   ``start_streaming_session``;
4. with ``--media``: wait for the avatar in the room with its video and audio tracks,
   ``ws_connect(ws_url)`` (no headers, as the plugin), wait for ``connected``, stream one
   utterance of 24 kHz PCM the way ``_forward_audio`` chunks it, then ``speak_end``;
   collect the events;
5. ``stop_streaming_session``.

Prints one JSON object with what it saw; exits non-zero on any failure.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import sys
import uuid
from typing import Any

import aiohttp  # the plugin's own dependency tree, not the venv's
from livekit import api, rtc  # type: ignore[attr-defined,unused-ignore]
from livekit.agents.voice.room_io import (  # type: ignore[import-not-found,import-untyped,unused-ignore]
    ATTRIBUTE_PUBLISH_ON_BEHALF,
)
from livekit.plugins.liveavatar import api as plugin_api  # type: ignore[import-not-found,import-untyped,unused-ignore]
from livekit.plugins.liveavatar import avatar as plugin_avatar  # type: ignore[import-not-found,import-untyped,unused-ignore]
from livekit.plugins.liveavatar.version import __version__  # type: ignore[import-not-found,import-untyped,unused-ignore]

TIMEOUT = 30.0


def tone(seconds: float, rate: int) -> bytes:
    """A voiced-sounding 24 kHz signal (two harmonics, syllable-like amplitude)."""
    out = bytearray()
    for n in range(int(seconds * rate)):
        t = n / rate
        envelope = 0.5 + 0.5 * math.sin(2 * math.pi * 4 * t)
        value = envelope * (0.4 * math.sin(2 * math.pi * 180 * t) + 0.2 * math.sin(2 * math.pi * 360 * t))
        out += int(value * 32767).to_bytes(2, "little", signed=True)
    return bytes(out)


async def wait_for(condition: Any, what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not condition():
            await asyncio.sleep(0.05)
    del what


async def main(args: argparse.Namespace) -> dict[str, Any]:
    seen: dict[str, Any] = {"plugin_version": __version__}
    room = rtc.Room()
    agent_token = (api.AccessToken(args.livekit_key, args.livekit_secret)
                   .with_identity("agent-job").with_name("agent-job").with_kind("agent")
                   .with_grants(api.VideoGrants(room_join=True, room=args.room)).to_jwt())
    async with asyncio.timeout(TIMEOUT):
        await room.connect(args.livekit_url, agent_token)
    # Exactly the plugin's token for the avatar (AvatarSession.start).
    avatar_identity = plugin_avatar._AVATAR_AGENT_IDENTITY
    livekit_token = (api.AccessToken(api_key=args.livekit_key, api_secret=args.livekit_secret)
                     .with_kind("agent").with_identity(avatar_identity)
                     .with_name(plugin_avatar._AVATAR_AGENT_NAME)
                     .with_grants(api.VideoGrants(room_join=True, room=room.name))
                     .with_attributes({ATTRIBUTE_PUBLISH_ON_BEHALF: room.local_participant.identity})
                     .to_jwt())
    try:
        async with aiohttp.ClientSession() as http:
            client = plugin_api.LiveAvatarAPI(args.api_key, api_url=args.api_url, session=http)
            created = await client.create_streaming_session(
                livekit_url=args.livekit_url, livekit_token=livekit_token, room=room,
                avatar_id="sim-avatar", is_sandbox=False, video_quality="low")
            seen["created"] = created
            session_id = created["data"]["session_id"]
            session_token = created["data"]["session_token"]
            started = await client.start_streaming_session(session_id, session_token)
            seen["started"] = started
            if args.media:
                seen.update(await media(http, room, started["data"]["ws_url"], avatar_identity))
            stopped = await client.stop_streaming_session(session_id, session_token)
            seen["stopped"] = stopped
            seen["stopped_again"] = await client.stop_streaming_session(session_id, session_token)
    finally:
        await room.disconnect()
    return seen


async def media(http: aiohttp.ClientSession, room: rtc.Room, ws_url: str,
                avatar_identity: str) -> dict[str, Any]:
    def avatar_tracks() -> int:
        participant = room.remote_participants.get(avatar_identity)
        return 0 if participant is None else len(participant.track_publications)

    await wait_for(lambda: avatar_tracks() >= 2, "the avatar's tracks")
    participant = room.remote_participants[avatar_identity]
    out: dict[str, Any] = {
        "avatar_kinds": sorted(str(p.kind) for p in participant.track_publications.values()),
        "participants": sorted(room.remote_participants),
    }
    events: list[dict[str, Any]] = []
    ws = await http.ws_connect(url=ws_url)  # as the plugin: no headers

    async def receive() -> None:
        async for message in ws:
            if message.type == aiohttp.WSMsgType.TEXT:
                events.append(json.loads(message.data))

    reader = asyncio.get_running_loop().create_task(receive())
    try:
        await wait_for(lambda: any(e.get("state") == "connected" for e in events), "connected")
        pcm = tone(2.2, plugin_avatar.SAMPLE_RATE)
        # _forward_audio's chunking: 0.6 s first, then 1 s, each with a fresh event id.
        bounds, size, position = [], int(0.6 * plugin_avatar.SAMPLE_RATE) * 2, 0
        while position < len(pcm):
            bounds.append(pcm[position:position + size])
            position += size
            size = plugin_avatar.SAMPLE_RATE * 2
        for chunk in bounds:
            await ws.send_json({"type": "agent.speak", "event_id": str(uuid.uuid4()),
                                "audio": base64.b64encode(chunk).decode("utf-8")})
        await ws.send_json({"type": "agent.speak_end", "event_id": str(uuid.uuid4())})
        await ws.send_json({"type": "agent.start_listening", "event_id": str(uuid.uuid4())})
        await ws.send_json({"type": "session.keep_alive", "event_id": str(uuid.uuid4())})
        await wait_for(lambda: any(e["type"] == "agent.speak_ended" for e in events), "speak_ended")
    finally:
        await ws.close()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    out["events"] = events
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for name in ("api-url", "api-key", "livekit-url", "livekit-key", "livekit-secret", "room"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--media", action="store_true")
    result = asyncio.run(main(parser.parse_args()))
    json.dump(result, sys.stdout)
    sys.stdout.flush()
    # The work is done and the room left. Skip the interpreter's teardown: livekit 1.1.21's
    # native runtime (the plugin pins it) can abort there, its exit-time disposal racing a
    # runtime thread ("panic in a function that cannot unwind", SIGABRT), seen once under
    # a CPU hog. A failure above still raises and exits non-zero.
    os._exit(0)
