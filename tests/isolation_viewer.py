"""A WHEP viewer in a process (and network namespace) of its own, for ``test_isolation.py``.

The test starts it with ``unshare --net`` and gives its namespace one end of a veth pair whose
other end it shapes with ``tc``, so only this viewer's packets cross the bad link. Being its
own process, it also has its own aioice (which gathers on the only non-loopback interface
here) and can be frozen with SIGSTOP without freezing the gateway.

Line-delimited JSON over stdin/stdout; the test relays the WHEP exchange:

* stdin ``{"go": true}`` once the link is up; stdout ``{"offer": sdp}``;
* stdin ``{"answer": sdp}``; stdout ``{"connected": true}``;
* stdin ``{"report": true}``; stdout ``{"arrivals": [...], "sizes": [...]}``:
  ``time.monotonic()`` of every decoded video frame (one clock for every process on the host,
  so the test's windows apply) and its ``[width, height]``;
* stdin EOF or ``{"quit": true}``: close and exit.

``--browser-jitter-buffer``: aiortc's video jitter buffer holds 512 packets and waits for a
missing one until 512 newer ones arrived; at a small picture's ~35 packets a second that is a
15 s freeze after any packet lost for good, where a browser drops the incomplete frame and
asks for a keyframe. With this flag it holds 64 packets (~2 s there), which the quality
ladder's tests use: they judge the gateway, not aiortc's patience.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from typing import Any

import av
from aiortc import (
    MediaStreamTrack,
    RTCConfiguration,
    RTCPeerConnection,
    RTCSessionDescription,
    rtcrtpreceiver,
)
from aiortc.jitterbuffer import JitterBuffer
from aiortc.mediastreams import MediaStreamError

BROWSER_JITTER_PACKETS = 64


def browser_like_jitter_buffer() -> None:
    class Shorter(JitterBuffer):
        def __init__(self, capacity: int, prefetch: int = 0, is_video: bool = False) -> None:
            super().__init__(BROWSER_JITTER_PACKETS if is_video else capacity, prefetch, is_video)

    setattr(rtcrtpreceiver, "JitterBuffer", Shorter)  # noqa: B010 - not a public name


def send(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    arrivals: list[float] = []
    sizes: list[tuple[int, int]] = []
    consumers: list[asyncio.Task[None]] = []
    connected = asyncio.Event()
    pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))

    async def consume(track: MediaStreamTrack) -> None:
        with contextlib.suppress(MediaStreamError):
            while True:
                frame = await track.recv()
                if isinstance(frame, av.VideoFrame):
                    arrivals.append(time.monotonic())
                    sizes.append((frame.width, frame.height))

    def on_track(track: MediaStreamTrack) -> None:
        consumers.append(loop.create_task(consume(track)))

    def on_state() -> None:
        if pc.connectionState == "connected" and not connected.is_set():
            connected.set()
            send({"connected": True})

    pc.on("track", on_track)
    pc.on("connectionstatechange", on_state)
    try:
        while line := await reader.readline():
            command = json.loads(line)
            if command.get("go"):
                pc.addTransceiver("video", direction="recvonly")
                pc.addTransceiver("audio", direction="recvonly")
                await pc.setLocalDescription(await pc.createOffer())
                send({"offer": pc.localDescription.sdp})
            elif "answer" in command:
                await pc.setRemoteDescription(RTCSessionDescription(command["answer"], "answer"))
            elif command.get("report"):
                send({"arrivals": arrivals, "sizes": sizes})
            elif command.get("quit"):
                break
    finally:
        await pc.close()
        for task in consumers:
            task.cancel()
        await asyncio.gather(*consumers, return_exceptions=True)


if __name__ == "__main__":
    if "--browser-jitter-buffer" in sys.argv[1:]:
        browser_like_jitter_buffer()
    asyncio.run(main())
