"""Offers aiortc cannot negotiate are the client's mistake: a 400 with a message, never a 500,
and no background task left failing ("Task exception was never retrieved")."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from .rtc_client import minimal_offer

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
