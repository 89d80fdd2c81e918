"""HTTP surface: sessions REST, WHEP mechanics, CORS, bad input, auth, ops endpoints."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient

from gateway.api.common import METRICS, SESSIONS
from gateway.app import create_app
from gateway.avatar.looks import DEFAULT_LOOK, LOOKS

from .conftest import ClientFactory, make_settings
from .rtc_client import minimal_offer

SDP = {"Content-Type": "application/sdp"}
FRAG = {"Content-Type": "application/trickle-ice-sdpfrag"}
Client = TestClient[Any, Any]


async def error_of(response: Any, status: int) -> str:
    assert response.status == status, await response.text()
    body = await response.json()
    assert set(body["error"]) == {"code", "message"}
    return str(body["error"]["message"])


async def test_session_crud(client: Client) -> None:
    response = await client.post("/v1/sessions", json={"quality": "low"})
    assert response.status == 201
    created = await response.json()
    assert response.headers["Location"] == f"/v1/sessions/{created['id']}"
    assert (created["state"], created["width"], created["height"]) == ("live", 640, 360)
    listed = await (await client.get("/v1/sessions")).json()
    assert [s["id"] for s in listed["sessions"]] == [created["id"]]
    assert (await client.get(f"/v1/sessions/{created['id']}")).status == 200
    deleted = await client.delete(f"/v1/sessions/{created['id']}")
    assert (await deleted.json())["state"] == "closed"
    assert (await client.get(f"/v1/sessions/{created['id']}")).status == 404
    assert len(client.app[SESSIONS]) == 0


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"upstream": "nope"}, "is not available"),
        ({"upstream": "heygen"}, "AVATAR_GATEWAY_HEYGEN_API_KEY"),
        ({"quality": "ultra"}, "quality must be one of"),
        ({"voice": "xx-nonexistent"}, "unknown voice"),
        ({"quality": 5}, "'quality' must be a string"),
    ],
)
async def test_create_session_bad_input(client: Client, body: dict[str, Any], needle: str) -> None:
    assert needle in await error_of(await client.post("/v1/sessions", json=body), 400)


async def test_speak_and_interrupt_validation(client: Client, session_id: str) -> None:
    url = f"/v1/sessions/{session_id}"
    assert "required" in await error_of(await client.post(f"{url}/speak", json={}), 400)
    assert "empty" in await error_of(await client.post(f"{url}/speak", json={"text": "  "}), 400)
    bad_json = await client.post(f"{url}/speak", data=b"{not json",
                                 headers={"Content-Type": "application/json"})
    assert "JSON" in await error_of(bad_json, 400)
    assert "JSON object" in await error_of(await client.post(f"{url}/speak", json=["a"]), 400)
    assert "task_type" in await error_of(
        await client.post(f"{url}/speak", json={"text": "hi", "task_type": "sing"}), 400)
    assert "empty" in await error_of(
        await client.post(f"{url}/speak", json={"text": " ", "task_type": "talk"}), 400)
    assert "longer than" in await error_of(
        await client.post(f"{url}/speak", json={"text": "a" * 6000}), 400)
    assert "application/json" in await error_of(
        await client.post(f"{url}/speak", data=b"text=hi", headers={"Content-Type": "text/plain"}), 415)
    ok = await client.post(f"{url}/speak", json={"text": "Hi."})
    assert ok.status == 200
    result = await ok.json()
    assert len(result["task_id"]) == 32 and result["duration_ms"] > 0
    assert (await client.post(f"{url}/interrupt")).status == 200


async def test_talk_on_the_local_avatar_speaks_the_gateways_answer(client: Client,
                                                                   session_id: str) -> None:
    # The local avatar has no language model: the gateway's chat service (offline responder
    # here, no OpenAI key) answers in the persona's voice and the avatar speaks each sentence.
    url = f"/v1/sessions/{session_id}/speak"
    response = await client.post(url, json={"text": "What is your name?",
                                            "task_type": "talk", "task_mode": "sync"})
    body = await response.json()
    assert response.status == 200, body
    # The default persona answers by the session's avatar's name; "[offline]" is a field,
    # not words the avatar says.
    assert f"I'm {LOOKS[DEFAULT_LOOK].title}" in body["text"], body
    assert body["offline"] is True and "[offline]" not in body["text"]
    assert body["task_ids"] and body["task_id"] == body["task_ids"][0]
    assert body["duration_ms"] > 0
    # sync: every sentence has been spoken by the time the answer comes back.
    replay = client.app[SESSIONS].get(session_id).events.subscribe(after_id=0)
    stopped = set()
    with contextlib.suppress(TimeoutError):
        while True:
            item = await asyncio.wait_for(anext(replay), 0.2)
            if item.event.type == "avatar_stop_talking":
                stopped.add(item.event.task_id)
    replay.close()
    assert set(body["task_ids"]) <= stopped


async def test_unknown_ids_are_404(client: Client, session_id: str) -> None:
    for method, path in [
        ("GET", "/v1/sessions/nope"),
        ("DELETE", "/v1/sessions/nope"),
        ("POST", "/v1/sessions/nope/speak"),
        ("POST", "/v1/sessions/nope/interrupt"),
        ("GET", "/v1/sessions/nope/events"),
        ("DELETE", f"/v1/sessions/{session_id}/whep/nope"),
        ("DELETE", "/v1/sessions/nope/whep/nope"),
        ("GET", "/no/such/route"),
    ]:
        body = {"text": "x"} if method == "POST" else None
        response = await client.request(method, path, json=body)
        assert "no " in (await error_of(response, 404)).lower() or path == "/no/such/route"
    patch = await client.patch(f"/v1/sessions/{session_id}/whep/nope", data="a=end-of-candidates",
                               headers=FRAG)
    await error_of(patch, 404)
    offer = await client.post("/v1/sessions/nope/whep", data=minimal_offer(), headers=SDP)
    await error_of(offer, 404)


@pytest.mark.parametrize(
    ("offer", "status", "needle"),
    [
        ("hello", 400, "v=0"),
        ("v=0\r\nthis is not sdp\r\n", 400, "malformed"),
        ("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF x\r\n",
         400, "malformed"),
        (minimal_offer(video=False, audio=False), 400, "neither a video nor an audio"),
        (minimal_offer(video_codecs=("VP9",)), 400, "neither VP8 nor H.264"),
        # H.264 in packetization-mode 0 (no fmtp) cannot carry our slices: not a codec we can send.
        (minimal_offer(video_codecs=("H264",), h264_fmtp=""), 400, "neither VP8 nor H.264"),
        (minimal_offer().replace("a=fingerprint", "a=x-fingerprint"), 400, "fingerprint"),
        (minimal_offer().replace("a=recvonly", "a=sendonly"), 400, "must receive"),
    ],
)
async def test_bad_offers_get_clear_400s(client: Client, session_id: str, offer: str, status: int,
                                         needle: str) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer, headers=SDP)
    assert needle in await error_of(response, status)
    assert (await client.get("/livez")).status == 200
    assert client.app[SESSIONS].get(session_id).viewer_count == 0
    assert client.app[SESSIONS].get(session_id).hub.subscribers == 0


@pytest.mark.parametrize(
    ("offered", "chosen", "refused"),
    [
        (("VP8", "H264"), "VP8/90000", "H264"),  # Chromium's and Firefox's order
        (("H264", "VP8"), "H264/90000", "VP8"),  # Safari's order
        (("VP9", "H264"), "H264/90000", "VP8"),
    ],
)
async def test_the_players_favourite_codec_is_answered(
        client: Client, session_id: str, offered: tuple[str, ...], chosen: str, refused: str) -> None:
    response = await client.post(f"/v1/sessions/{session_id}/whep",
                                 data=minimal_offer(video_codecs=offered), headers=SDP)
    answer = await response.text()
    assert response.status == 201, answer
    video = answer[answer.index("m=video"):answer.index("m=audio")]
    assert chosen in video and refused not in video
    if chosen.startswith("H264"):
        assert "packetization-mode=1" in video and "profile-level-id=42e01f" in video
    await client.delete(response.headers["Location"])


async def test_offer_content_type_and_size(client: Client, session_id: str) -> None:
    url = f"/v1/sessions/{session_id}/whep"
    assert "application/sdp" in await error_of(
        await client.post(url, data=minimal_offer(), headers={"Content-Type": "text/plain"}), 415)
    assert "larger than" in await error_of(
        await client.post(url, data="v=0\r\n" + "a=x\r\n" * 20000, headers=SDP), 413)
    assert "UTF-8" in await error_of(await client.post(url, data=b"v=0\xff\xfe", headers=SDP), 400)
    # The server keeps serving.
    assert (await client.get(f"/v1/sessions/{session_id}")).status == 200


async def test_whep_lifecycle_without_media(client: Client, session_id: str) -> None:
    url = f"/v1/sessions/{session_id}/whep"
    response = await client.post(url, data=minimal_offer(), headers=SDP)
    answer = await response.text()
    assert response.status == 201, answer
    assert response.content_type == "application/sdp"
    assert answer.startswith("v=0") and "VP8/90000" in answer and "a=sendonly" in answer
    assert "H264" not in answer  # one codec per viewer: the answer allows nothing else
    assert "a=candidate:" in answer
    location, etag = response.headers["Location"], response.headers["ETag"]
    assert location.startswith(url + "/") and etag.startswith('"')

    candidate = "a=mid:0\r\na=candidate:1 1 udp 2130706431 10.203.0.9 40000 typ host\r\n"
    ok = await client.patch(location, data=candidate, headers={**FRAG, "If-Match": etag})
    assert ok.status == 204
    assert (await client.patch(location, data="a=end-of-candidates\r\n", headers=FRAG)).status == 204
    assert "If-Match" in await error_of(
        await client.patch(location, data=candidate, headers={**FRAG, "If-Match": '"stale"'}), 412)
    restart = "a=ice-ufrag:newu\r\na=ice-pwd:newpasswordnewpassword12\r\n"
    assert "ICE restart" in await error_of(
        await client.patch(location, data=restart, headers={**FRAG, "If-Match": "*"}), 422)
    assert "trickle-ice-sdpfrag" in await error_of(
        await client.patch(location, data=candidate, headers=SDP), 415)
    assert "malformed" in await error_of(
        await client.patch(location, data="a=candidate:garbage\r\n", headers=FRAG), 400)

    assert (await client.delete(location)).status == 200
    await error_of(await client.delete(location), 404)
    session = client.app[SESSIONS].get(session_id)
    assert session.viewer_count == 0 and session.hub.subscribers == 0


async def test_viewer_that_never_connects_is_closed(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(viewer_connect_timeout=0.3)))
    created = await (await client.post("/v1/sessions")).json()
    response = await client.post(created["whep_url"], data=minimal_offer(), headers=SDP)
    assert response.status == 201
    session = client.app[SESSIONS].get(created["id"])
    assert session.viewer_count == 1
    async with asyncio.timeout(20):
        while session.viewer_count:
            await asyncio.sleep(0.05)
    assert session.hub.subscribers == 0
    metrics = client.app[METRICS]
    assert metrics.viewer_disconnects.labels("connect_timeout")._value.get() == 1
    assert metrics.viewers.labels("connecting")._value.get() == 0
    # The session's status says so, for whoever wonders why their page stays black.
    status = await (await client.get(f"/v1/sessions/{created['id']}")).json()
    assert status["viewer_failures"] == {"connect_timeout": 1}
    assert status["last_viewer_failure"]["reason"] == "connect_timeout"
    assert "did not connect" in status["last_viewer_failure"]["message"]


async def test_cors_preflight(client: Client, session_id: str) -> None:
    url = f"/v1/sessions/{session_id}/whep"
    pre = await client.options(url, headers={"Origin": "https://example.org",
                                             "Access-Control-Request-Method": "POST"})
    assert pre.status == 204
    assert pre.headers["Accept-Post"] == "application/sdp"
    assert "If-Match" in pre.headers["Access-Control-Allow-Headers"]
    assert "Authorization" in pre.headers["Access-Control-Allow-Headers"]
    assert "PATCH" in pre.headers["Access-Control-Allow-Methods"]
    assert {"Location", "ETag", "Link"} <= {
        h.strip() for h in pre.headers["Access-Control-Expose-Headers"].split(",")}
    resource = await client.options(url + "/someviewer")
    assert resource.headers["Accept-Patch"] == "application/trickle-ice-sdpfrag"
    got = await client.get("/v1/sessions", headers={"Origin": "https://example.org"})
    assert got.headers["Access-Control-Allow-Origin"] == "*"


async def test_method_not_allowed(client: Client, session_id: str) -> None:
    response = await client.get(f"/v1/sessions/{session_id}/whep")
    await error_of(response, 405)
    assert "POST" in response.headers["Allow"]


async def test_ice_servers_are_advertised_in_link_headers(aiohttp_client: ClientFactory) -> None:
    settings = make_settings(ice_servers=("stun:stun.example.org:3478", "turn:turn.example.org:3478"),
                             ice_username="user", ice_credential="pa\"ss")
    client = await aiohttp_client(create_app(settings))
    created = await (await client.post("/v1/sessions")).json()
    response = await client.post(created["whep_url"], data=minimal_offer(), headers=SDP)
    assert response.status == 201
    links = response.headers.getall("Link")
    assert links[0] == '<stun:stun.example.org:3478>; rel="ice-server"'
    assert 'username="user"' in links[1] and 'credential="pa\\"ss"' in links[1]


async def test_bearer_token_required_when_configured(aiohttp_client: ClientFactory) -> None:
    app: web.Application = create_app(make_settings(api_token="tok"))
    client = await aiohttp_client(app)
    assert "Bearer" in await error_of(await client.post("/v1/sessions"), 401)
    assert (await client.post("/v1/sessions", headers={"Authorization": "Bearer nope"})).status == 401
    created = await client.post("/v1/sessions", headers={"Authorization": "Bearer tok"})
    assert created.status == 201
    # Preflights and health checks stay open; the page itself carries no secret.
    assert (await client.options("/v1/sessions")).status == 204
    assert (await client.get("/livez")).status == 200


async def test_session_limit_is_429_with_retry_after(aiohttp_client: ClientFactory) -> None:
    client = await aiohttp_client(create_app(make_settings(max_sessions=1)))
    assert (await client.post("/v1/sessions")).status == 201
    response = await client.post("/v1/sessions")
    assert "maximum" in await error_of(response, 429)
    assert int(response.headers["Retry-After"]) > 0
    # Still ready: the open session's viewers must reach it; the body says it is full.
    ready = await client.get("/readyz")
    assert ready.status == 200 and (await ready.json())["full"] is True


async def test_ops_endpoints(client: Client, session_id: str) -> None:
    assert (await client.get("/livez")).status == 200
    assert (await client.get("/readyz")).status == 200
    text = await (await client.get("/metrics")).text()
    assert 'avatargw_sessions{state="live",upstream="local"} 1.0' in text
    assert "avatargw_build_info{" in text
    assert 'avatargw_http_requests_total{code="201",method="POST",route="/v1/sessions"} 1.0' in text
    assert session_id not in text  # no session ids as labels
    page = await client.get("/")
    assert page.status == 200 and "/web/demo.js" in await page.text()
    for path in ("/web/demo.js", "/web/viewer.html", "/web/sdk/index.js", "/web/sdk/whep.js",
                 "/web/sdk/index.d.ts"):
        assert (await client.get(path)).status == 200, path


async def test_shutdown_closes_every_session(aiohttp_client: ClientFactory) -> None:
    app = create_app(make_settings())
    client = await aiohttp_client(app)
    for _ in range(2):
        assert (await client.post("/v1/sessions")).status == 201
    sessions = app[SESSIONS].list()
    await client.close()  # runs on_shutdown + cleanup
    assert len(app[SESSIONS]) == 0
    assert all(s.state == "closed" for s in sessions)


@pytest.mark.parametrize(
    ("mutate", "needle"),
    [
        # A second section without its own DTLS fingerprint / setup.
        (lambda o: o.replace("m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
                             "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"
                             "a=fingerprint:sha-256 " + ":".join(["AB"] * 32) + "\r\n"
                             "a=setup:actpass\r\n",
                             "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\n"
                             "a=ice-ufrag:abcd\r\na=ice-pwd:abcdefghijklmnopqrstuvwx\r\n"),
         "fingerprint"),
        # An a=fmtp for a payload type with no a=rtpmap (aiortc raises StopIteration).
        (lambda o: o.replace("a=rtpmap:96 VP8/90000", "a=rtpmap:97 VP8/90000\r\na=fmtp:96 x=1"),
         "malformed"),
    ],
)
async def test_offers_that_crash_the_sdp_parser_are_400s(
    client: Client, session_id: str, mutate: Any, needle: str
) -> None:
    offer = mutate(minimal_offer())
    assert offer != minimal_offer()
    response = await client.post(f"/v1/sessions/{session_id}/whep", data=offer, headers=SDP)
    assert needle in await error_of(response, 400)
    assert client.app[SESSIONS].get(session_id).viewer_count == 0


async def test_catalog_lists_what_a_session_can_be_created_with(client: Client) -> None:
    response = await client.get("/v1/catalog")
    catalog = await response.json()
    assert response.status == 200
    assert [q["id"] for q in catalog["qualities"]] == ["high", "medium", "low"]
    upstreams = {u["kind"]: u for u in catalog["upstreams"]}
    local = upstreams["local"]
    assert local["available"] and not local["paid"]
    assert [a["id"] for a in local["avatars"]] == ["ada", "ben", "cleo"]
    assert "en-us" in {v["id"] for v in local["voices"]} and local["default_voice"] == "en-us"
    # No keys in this test: the cloud upstreams are listed, but not available.
    assert not upstreams["heygen"]["available"] and not upstreams["liveavatar"]["available"]
    # Voice chat: the local avatar and HeyGen listen; LiveAvatar only in FULL mode (the default).
    assert local["listens"] and upstreams["heygen"]["listens"]
    assert upstreams["liveavatar"]["mode"] == "full" and upstreams["liveavatar"]["listens"]
    for avatar in local["avatars"][1:]:
        created = await client.post("/v1/sessions", json={"avatar_id": avatar["id"],
                                                          "voice": "en-gb", "quality": "low"})
        assert created.status == 201, await created.text()
        await client.delete(f"/v1/sessions/{(await created.json())['id']}")
    refused = await client.post("/v1/sessions", json={"avatar_id": "zoe"})
    assert "available: ada, ben, cleo" in await error_of(refused, 400)
    assert "voice" in await error_of(await client.post("/v1/sessions", json={"voice": "xx-nope"}), 400)


async def test_sessions_carry_the_ice_servers_players_need(aiohttp_client: ClientFactory) -> None:
    settings = make_settings(ice_servers=("stun:stun.example.org:3478",
                                          "turns:turn.example.org:443?transport=tcp"),
                             ice_username="user", ice_credential="pass")
    client = await aiohttp_client(create_app(settings))
    created = await (await client.post("/v1/sessions")).json()
    assert created["ice_servers"] == [
        {"urls": ["stun:stun.example.org:3478"]},
        {"urls": ["turns:turn.example.org:443?transport=tcp"], "username": "user",
         "credential": "pass", "credentialType": "password"},
    ]
    listed = await (await client.get(f"/v1/sessions/{created['id']}")).json()
    assert listed["ice_servers"] == created["ice_servers"]


async def test_first_failures_are_visible_to_increase(client: Client) -> None:
    # A failure series that appears only when it first happens hides that failure from
    # increase(): every closed outcome is exported at 0 from the start.
    text = await (await client.get("/metrics")).text()
    for result in ("ok", "quota", "auth", "unavailable", "error"):
        line = f'avatargw_upstream_session_starts_total{{result="{result}",upstream="heygen"}} 0.0'
        assert line in text
