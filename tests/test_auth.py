"""Every role boundary: viewers watch one session and drive nothing; controllers drive and mint
viewer tokens; only the admin mints controllers; bad, tampered and expired tokens are 401."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from gateway.app import create_app
from gateway.auth import Role, TokenAuthority

from .conftest import ClientFactory, make_settings
from .rtc_client import minimal_offer

Client = TestClient[Any, Any]
CONTROLLER = {"Authorization": "Bearer ctl-token"}
ADMIN = {"Authorization": "Bearer adm-token"}
SDP = {"Content-Type": "application/sdp"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def gateway(aiohttp_client: ClientFactory) -> Client:
    return await aiohttp_client(create_app(make_settings(api_token="ctl-token",
                                                         admin_token="adm-token")))


async def new_session(client: Client) -> str:
    response = await client.post("/v1/sessions", headers=CONTROLLER)
    assert response.status == 201, await response.text()
    return str((await response.json())["id"])


async def mint(client: Client, headers: dict[str, str], **body: Any) -> dict[str, Any]:
    response = await client.post("/v1/tokens", json=body, headers=headers)
    data: dict[str, Any] = await response.json()
    assert response.status == 201, data
    return data


async def status(client: Client, method: str, path: str, headers: dict[str, str],
                 **kwargs: Any) -> int:
    async with client.request(method, path, headers=headers, **kwargs) as response:
        return response.status


async def test_no_token_is_401_and_public_routes_stay_open(gateway: Client) -> None:
    session_id = await new_session(gateway)
    for method, path in [("GET", "/v1/sessions"), ("POST", "/v1/sessions"),
                         ("GET", f"/v1/sessions/{session_id}"),
                         ("POST", f"/v1/sessions/{session_id}/speak"),
                         ("GET", f"/v1/sessions/{session_id}/events"),
                         ("POST", f"/v1/sessions/{session_id}/whep"),
                         ("POST", "/v1/tokens"), ("GET", "/v1/catalog"), ("GET", "/persona"),
                         ("POST", "/openai/complete")]:
        async with gateway.request(method, path) as response:
            assert response.status == 401, (method, path)
            assert "Bearer" in (await response.text())
    for path in ("/livez", "/readyz", "/metrics", "/openapi.json", "/", "/web/sdk/index.js"):
        assert await status(gateway, "GET", path, {}) == 200, path
    assert await status(gateway, "OPTIONS", "/v1/sessions", {}) == 204


async def test_a_viewer_token_watches_its_session_and_drives_nothing(gateway: Client) -> None:
    mine, other = await new_session(gateway), await new_session(gateway)
    minted = await mint(gateway, CONTROLLER, role="viewer", session_id=mine, ttl=60)
    assert minted["role"] == "viewer" and minted["session_id"] == mine
    assert minted["watch_url"] == f"/web/viewer.html?session={mine}#token={minted['token']}"
    viewer = bearer(minted["token"])

    # What it may do, on its own session.
    assert await status(gateway, "GET", f"/v1/sessions/{mine}", viewer) == 200
    async with gateway.get(f"/v1/sessions/{mine}/events", headers=viewer) as events:
        assert events.status == 200
    # EventSource cannot set headers: the token also works as ?access_token=.
    async with gateway.get(f"/v1/sessions/{mine}/events?access_token={minted['token']}") as events:
        assert events.status == 200
    # ...and nowhere else: a token in a URL ends up in proxy logs and browser history.
    for method, path in (("GET", f"/v1/sessions/{mine}"), ("POST", f"/v1/sessions/{mine}/whep")):
        async with gateway.request(method, f"{path}?access_token={minted['token']}") as response:
            assert response.status == 401, (method, path, response.status)
            assert "only accepted on the event stream" in await response.text()
    answer = await gateway.post(f"/v1/sessions/{mine}/whep", data=minimal_offer(),
                                headers={**SDP, **viewer})
    assert answer.status == 201
    location = answer.headers["Location"]
    assert await status(gateway, "DELETE", location, viewer) == 200

    # What it may not: drive, list, create, mint, or touch another session.
    forbidden: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", f"/v1/sessions/{mine}/speak", {"json": {"text": "hi"}}),
        ("POST", f"/v1/sessions/{mine}/interrupt", {}),
        ("POST", f"/v1/sessions/{mine}/listen", {"json": {"listening": True}}),
        ("POST", f"/v1/sessions/{mine}/keep-alive", {}),
        ("DELETE", f"/v1/sessions/{mine}", {}),
        ("GET", "/v1/sessions", {}),
        ("POST", "/v1/sessions", {}),
        ("POST", "/v1/tokens", {"json": {"role": "viewer", "session_id": mine}}),
        ("GET", "/v1/catalog", {}),
        ("GET", "/persona", {}),
        ("POST", "/persona/heygen/session/create", {"json": {}}),
        ("GET", f"/v1/sessions/{other}", {}),
        ("GET", f"/v1/sessions/{other}/events", {}),
        ("POST", f"/v1/sessions/{other}/whep", {"data": minimal_offer(), "headers": SDP}),
    ]
    for method, path, kwargs in forbidden:
        headers = {**kwargs.pop("headers", {}), **viewer}
        async with gateway.request(method, path, headers=headers, **kwargs) as response:
            body = await response.json()
            assert response.status == 403, (method, path, body)
            error = body["error"]  # the seed API's envelope carries the code as a string
            assert (error["code"] if isinstance(error, dict) else error.split(":")[0]) == "forbidden"
    # Nothing happened: both sessions are still live, with no viewer left.
    listed = await (await gateway.get("/v1/sessions", headers=CONTROLLER)).json()
    assert sorted(s["id"] for s in listed["sessions"]) == sorted([mine, other])
    assert all(s["viewers"] == 0 for s in listed["sessions"])


def audio_sendrecv(offer: str) -> str:
    head, audio = offer.split("m=audio", 1)
    return head + "m=audio" + audio.replace("a=recvonly", "a=sendrecv")


def audio_direction(answer: str) -> str:
    audio = answer.split("m=audio", 1)[1]
    return next(d for d in ("sendrecv", "sendonly", "recvonly", "inactive") if f"a={d}" in audio)


async def test_only_a_controller_microphone_reaches_the_avatar(gateway: Client) -> None:
    session_id = await new_session(gateway)  # the local avatar listens: it takes microphones
    viewer = bearer((await mint(gateway, CONTROLLER, session_id=session_id))["token"])
    offer = audio_sendrecv(minimal_offer())
    as_controller = await gateway.post(f"/v1/sessions/{session_id}/whep", data=offer,
                                       headers={**SDP, **CONTROLLER})
    as_viewer = await gateway.post(f"/v1/sessions/{session_id}/whep", data=offer,
                                   headers={**SDP, **viewer})
    assert as_controller.status == as_viewer.status == 201
    assert audio_direction(await as_controller.text()) == "sendrecv"
    assert audio_direction(await as_viewer.text()) == "sendonly"  # it hears; it is not heard


async def test_expired_tampered_and_foreign_tokens_are_401(gateway: Client,
                                                           aiohttp_client: ClientFactory) -> None:
    session_id = await new_session(gateway)
    path = f"/v1/sessions/{session_id}"
    short = (await mint(gateway, CONTROLLER, session_id=session_id, ttl=2.0))["token"]
    # Valid until it expires (2 s: room for a busy machine's stalls), refused from then on.
    assert await status(gateway, "GET", path, bearer(short)) == 200
    await asyncio.sleep(2.0)
    async with gateway.get(path, headers=bearer(short)) as response:
        assert response.status == 401 and "expired" in await response.text()

    token = (await mint(gateway, CONTROLLER, session_id=session_id))["token"]
    prefix, body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["role"] = "controller"  # a viewer promoting itself
    forged = base64.urlsafe_b64encode(json.dumps(payload).encode()).rstrip(b"=").decode()
    for bad in (f"{prefix}.{forged}.{signature}", token[:-2] + ("AA" if token[-2:] != "AA" else "BB"),
                "v1.x.y", "not-a-token", "ctl-token-but-longer"):
        async with gateway.get(path, headers=bearer(bad)) as response:
            assert response.status == 401, bad
    # Another gateway (another signing key) mints nothing this one accepts.
    foreign = TokenAuthority(make_settings(api_token="x", token_secret="other-key"))
    alien, _ = foreign.mint(Role.VIEWER, session_id, 60)
    assert await status(gateway, "GET", path, bearer(alien)) == 401


async def test_only_the_admin_mints_controller_tokens(gateway: Client) -> None:
    async with gateway.post("/v1/tokens", json={"role": "controller"}, headers=CONTROLLER) as r:
        assert r.status == 403 and "admin" in await r.text()
    minted = await mint(gateway, ADMIN, role="controller", ttl=120)
    assert minted["session_id"] is None and minted["expires_in"] == 120
    controller = bearer(minted["token"])
    created = await gateway.post("/v1/sessions", headers=controller)
    assert created.status == 201
    session_id = (await created.json())["id"]
    assert await status(gateway, "POST", f"/v1/sessions/{session_id}/speak", controller,
                        json={"text": "Minted for a browser."}) == 200
    # A minted controller mints viewers, not controllers.
    await mint(gateway, controller, session_id=session_id)
    async with gateway.post("/v1/tokens", json={"role": "controller"}, headers=controller) as r:
        assert r.status == 403


@pytest.mark.parametrize(("body", "code", "needle"), [
    ({"role": "viewer"}, 400, "session_id"),
    ({"role": "viewer", "session_id": "nope"}, 404, "nope"),
    ({"role": "root"}, 400, "viewer or controller"),
    ({"role": "viewer", "session_id": "x", "ttl": 0}, 400, "ttl"),
    ({"role": "viewer", "session_id": "x", "ttl": 10**9}, 400, "ttl"),
    ({"role": "viewer", "session_id": "x", "ttl": "long"}, 400, "ttl"),
    ({"role": "controller", "session_id": "x"}, 400, "session_id"),
])
async def test_minting_bad_input_is_a_clear_4xx(gateway: Client, body: dict[str, Any], code: int,
                                                needle: str) -> None:
    async with gateway.post("/v1/tokens", json=body, headers=ADMIN) as response:
        assert response.status == code
        assert needle in (await response.json())["error"]["message"]


def test_a_public_bind_needs_a_token_of_some_kind() -> None:
    from gateway.config import ConfigError, Settings

    with pytest.raises(ConfigError, match="without authentication"):
        Settings.from_env({}, host="0.0.0.0")
    assert Settings.from_env({}, host="0.0.0.0", admin_token="a").admin_token
    assert Settings.from_env({}, host="0.0.0.0", allow_insecure=True).allow_insecure


async def test_a_revoked_token_is_refused(gateway: Client) -> None:
    session_id = await new_session(gateway)
    viewer = (await mint(gateway, CONTROLLER, session_id=session_id))["token"]
    controller = (await mint(gateway, ADMIN, role="controller"))["token"]
    assert await status(gateway, "GET", f"/v1/sessions/{session_id}", bearer(viewer)) == 200
    # A controller revokes a viewer token (a share link that leaked)...
    revoked = await gateway.post("/v1/tokens/revoke", json={"token": viewer}, headers=CONTROLLER)
    body = await revoked.json()
    assert revoked.status == 200 and body["role"] == "viewer" and body["session_id"] == session_id
    response = await gateway.get(f"/v1/sessions/{session_id}", headers=bearer(viewer))
    assert response.status == 401 and "revoked" in (await response.json())["error"]["message"]
    # ... but not a controller token; the admin may.
    refused = await gateway.post("/v1/tokens/revoke", json={"token": controller},
                                 headers=CONTROLLER)
    assert refused.status == 403
    assert (await gateway.post("/v1/tokens/revoke", json={"token": controller},
                               headers=ADMIN)).status == 200
    assert await status(gateway, "GET", "/v1/sessions", bearer(controller)) == 401
    # Configured tokens and garbage are clear 400s.
    for token in ("ctl-token", "not-a-token", viewer):
        response = await gateway.post("/v1/tokens/revoke", json={"token": token}, headers=ADMIN)
        assert response.status == 400, token
