"""What a viewer-token holder can send, sent as an attacker would: offers aiortc cannot
negotiate (a 400 with a message, never a 500, no background task left failing), candidate
floods, UDP floods at a pending viewer's port, offers that never connect."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sys
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.api.common import SESSIONS
from gateway.app import create_app

from .conftest import ClientFactory, make_settings
from .leaks import trimmed_rss
from .rtc_client import WhepViewer, minimal_offer

Client = TestClient[Any, Any]


def _drop(prefix: str, kind: str | None = None) -> Callable[[str], str]:
    """Remove the lines starting with ``prefix`` (only in the ``kind`` m-section if given)."""
    def mutate(sdp: str) -> str:
        out, section = [], "session"
        for line in sdp.split("\r\n"):
            if line.startswith("m="):
                section = line[2:].split(" ", 1)[0]
            if line.startswith(prefix) and kind in (None, section):
                continue
            out.append(line)
        return "\r\n".join(out)
    return mutate


def _replace(old: str, new: str) -> Callable[[str], str]:
    return lambda sdp: sdp.replace(old, new)


def _add(after: str, line: str) -> Callable[[str], str]:
    return lambda sdp: sdp.replace(after + "\r\n", after + "\r\n" + line + "\r\n", 1)


MUTATIONS: dict[str, Callable[[str], str]] = {
    "video mid removed": _drop("a=mid:", "video"),
    "audio mid removed": _drop("a=mid:", "audio"),
    "every mid removed": _drop("a=mid:"),
    "duplicated mid": _replace("a=mid:1", "a=mid:0"),
    "bundle group removed": _drop("a=group:"),
    "bundle names an unknown mid": _replace("a=group:BUNDLE 0 1", "a=group:BUNDLE 0 7"),
    "rtcp-mux absent": _drop("a=rtcp-mux"),
    "ssrc-group without ssrcs": _add("a=mid:0", "a=ssrc-group:FID 1 2"),
    "rid and simulcast": _add("a=mid:0", "a=rid:h recv\r\na=rid:l recv\r\na=simulcast:recv h;l"),
    "payload type out of range": _replace("a=rtpmap:96 VP8/90000", "a=rtpmap:300 VP8/90000"),
    "fmtp without rtpmap": _add("a=rtpmap:96 VP8/90000", "a=fmtp:97 apt=96"),
    "rtx for a missing payload type": _add("a=rtpmap:96 VP8/90000",
                                           "a=rtpmap:97 rtx/90000\r\na=fmtp:97 apt=55"),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
async def test_mutated_offer_is_a_client_error(client: Client, session_id: str, name: str,
                                               caplog: pytest.LogCaptureFixture) -> None:
    offer = MUTATIONS[name](minimal_offer())
    assert offer != minimal_offer(), f"mutation {name!r} changed nothing"
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer,
                                 headers={"Content-Type": "application/sdp"})
    body = await response.text()
    # Some mutations are harmless to a tolerant parser: answered 201 is fine, 5xx never is.
    assert response.status in (201, 400, 415, 422), (name, response.status, body)
    if response.status != 201:
        assert "error" in body and len(body) > 20, body
    else:
        location = response.headers["Location"]
        assert (await client.delete(location)).status == 200
    # A failed negotiation must leave no task failing in the background.
    await asyncio.sleep(0.2)
    gc.collect()
    never_retrieved = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert not never_retrieved, [r.getMessage() for r in never_retrieved]
    listing = await (await client.get(f"/v1/sessions/{session_id}")).json()
    assert listing["viewers"] == 0, listing


def _candidates(count: int, address: str = "10.203.0.77") -> str:
    return "".join(f"a=candidate:{i} 1 udp {2130706431 - i} {address} {40000 + i} typ host\r\n"
                   for i in range(count))


async def test_candidate_floods_and_unreachable_addresses_are_refused(client: Client,
                                                                      session_id: str) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                 headers={"Content-Type": "application/sdp"})
    assert response.status == 201
    location = response.headers["Location"]
    frag = {"Content-Type": "application/trickle-ice-sdpfrag"}

    async def patch(body: str) -> tuple[int, str]:
        async with client.patch(location, data="a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
                                + "m=audio 9 UDP/TLS/RTP/SAVPF 0\r\na=mid:0\r\n" + body,
                                headers=frag) as r:
            return r.status, await r.text()

    # One PATCH of 1000 candidates (55 KB) is refused whole, before aioice sees any of it.
    status, text = await patch(_candidates(1000))
    assert status == 400 and "at most 32" in text, text
    for bad in ("224.0.0.251", "0.0.0.0", "255.255.255.255", "ff02::1", "not-an-address"):
        status, text = await patch(_candidates(1, bad))
        assert status == 400 and "candidate address" in text, (bad, text)
    # The budget is per viewer: small PATCHes add up to the same limit.
    assert (await patch(_candidates(20)))[0] == 204
    status, text = await patch(_candidates(13, "10.203.0.78"))
    assert status == 400 and "has sent 20" in text, text
    assert (await patch(_candidates(12, "10.203.0.79")))[0] == 204
    assert (await client.delete(location)).status == 200


async def test_an_offer_carrying_too_many_candidates_is_refused(client: Client,
                                                                session_id: str) -> None:
    offer = minimal_offer().replace("a=mid:0\r\n", "a=mid:0\r\n" + _candidates(40), 1)
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer,
                                 headers={"Content-Type": "application/sdp"})
    assert response.status == 400 and "at most 32" in await response.text()
    multicast = minimal_offer().replace("a=mid:0\r\n", "a=mid:0\r\n" + _candidates(1, "239.1.1.1"), 1)
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=multicast,
                                 headers={"Content-Type": "application/sdp"})
    assert response.status == 400 and "multicast" in await response.text()


FLOOD = """
import socket, sys
host, port, total, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM)
junk = bytes([0x17]) * size  # not STUN: aioice hands it to DTLS's queue
for _ in range(total // size):
    try:
        sock.sendto(junk, (host, port))
    except OSError:
        pass  # the kernel refused one (buffer full): a flood does not care
"""


@pytest.mark.parametrize("size", [1200, 60_000])
async def test_udp_flood_to_a_pending_viewer_does_not_grow_memory(client: Client, session_id: str,
                                                                  size: int) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                 headers={"Content-Type": "application/sdp"})
    assert response.status == 201
    answer = await response.text()
    host, port = next((parts[4], int(parts[5])) for line in answer.split("\r\n")
                      if line.startswith("a=candidate:") and (parts := line.split()))
    await asyncio.sleep(0.5)
    before = trimmed_rss()
    # 1 GB of garbage (in MTU-sized or in huge datagrams) to the port the answer names, from
    # another process; the viewer never starts ICE, so nothing ever reads aioice's queue.
    total = 1 << 30
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOD, host, str(port), str(total), str(size))
    assert await asyncio.wait_for(flood.wait(), 300) == 0
    await asyncio.sleep(0.5)  # let the gateway read what the kernel still holds
    growth = trimmed_rss() - before
    assert growth < 50 << 20, f"RSS grew by {growth / 2**20:.0f} MiB under a UDP flood"
    assert (await client.delete(response.headers["Location"])).status == 200


async def test_one_clients_unconnected_offers_lock_nobody_out(
        aiohttp_client: ClientFactory) -> None:
    gateway = await aiohttp_client(create_app(make_settings(
        api_token="ctl", max_viewers_per_session=8, max_pending_viewers_per_session=6,
        max_pending_viewers_per_client=4)))
    controller = {"Authorization": "Bearer ctl"}
    created = await gateway.post("/v1/sessions", json={}, headers=controller)
    assert created.status == 201, await created.text()
    session_id = (await created.json())["id"]

    async def viewer_token() -> dict[str, str]:
        minted = await gateway.post("/v1/tokens", json={"role": "viewer", "session_id": session_id},
                                    headers=controller)
        return {"Authorization": f"Bearer {(await minted.json())['token']}"}

    attacker = await viewer_token()
    statuses = []
    # 300 offers that will never connect, from one token: the first few hold a place...
    for _ in range(300):
        async with gateway.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                headers={"Content-Type": "application/sdp", **attacker}) as r:
            statuses.append(r.status)
            if r.status == 429:
                assert "have not connected" in await r.text()
                assert r.headers["Retry-After"]
    assert statuses.count(201) == 4 and statuses.count(429) == 296, statuses[:8]
    # ...and the pending share of the session is bounded too, whoever asks.
    second = await viewer_token()
    for expected in (201, 201, 429):
        async with gateway.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                headers={"Content-Type": "application/sdp", **second}) as r:
            assert r.status == expected, await r.text()
            if r.status == 429:
                assert "still connecting" in await r.text()
    # Connected viewers are not held back by either: a real one frees no pending place.
    assert (await gateway.get(f"/v1/sessions/{session_id}", headers=controller)).status == 200
    session = gateway.app[SESSIONS].get(session_id)
    pending = [v for v in session.viewers() if v.state == "connecting"]
    assert len(pending) == 6
    for viewer in pending[:2]:
        await viewer.close("test")
    honest = WhepViewer(gateway, session_id, headers=await viewer_token())
    try:
        await honest.connect()
        assert session.viewer_count == 5
    finally:
        await honest.close()
    await gateway.delete(f"/v1/sessions/{session_id}", headers=controller)


async def test_patch_floods_freeze_nothing(client: Client, session_id: str) -> None:
    """Before the candidate cap, four 1000-candidate PATCHes at one pending viewer took 4-20 s
    each on the event loop; a real viewer of the same session fell from 30 fps to 0."""
    honest = WhepViewer(client, session_id)
    await honest.connect()
    try:
        await asyncio.wait_for(honest.first_frame.wait(), 30)
        pending = await client.post(f"/v1/sessions/{session_id}/whep", data=minimal_offer(),
                                    headers={"Content-Type": "application/sdp"})
        assert pending.status == 201
        loop = asyncio.get_running_loop()
        lags: list[float] = []

        async def probe() -> None:
            while True:
                before = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - before - 0.01)

        def frames_between(start: float, end: float) -> int:
            return sum(start <= s.arrival < end for s in honest.received.video)

        calm_start = loop.time()
        await asyncio.sleep(3.0)
        calm_end = flood_start = loop.time()
        prober = loop.create_task(probe())
        flood = ("a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\nm=audio 9 UDP/TLS/RTP/SAVPF 0\r\n"
                 "a=mid:0\r\n" + _candidates(1000))
        answered = []
        try:
            while loop.time() - flood_start < 3.0:
                async with client.patch(pending.headers["Location"], data=flood,
                                        headers={"Content-Type": "application/trickle-ice-sdpfrag"}) as r:
                    answered.append(r.status)
        finally:
            prober.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await prober
        flood_end = loop.time()
        calm = frames_between(calm_start, calm_end) / (calm_end - calm_start)
        during = frames_between(flood_start, flood_end) / (flood_end - flood_start)
        print(f"PATCH flood: {len(answered)} PATCHes of 1000 candidates, all {set(answered)}; "
              f"viewer {calm:.1f} fps before, {during:.1f} fps during; "
              f"loop lag max {max(lags) * 1000:.0f} ms")
        assert set(answered) == {400} and len(answered) >= 10
        # Relative to the same viewer just before: a busy machine slows both windows alike.
        assert during >= 0.8 * calm, (calm, during)
        # Generous (a loaded CI machine): the unfixed gateway stalled for seconds per PATCH.
        assert max(lags) < 1.0, max(lags)
    finally:
        await honest.close()
