"""WHEP mechanics (RFC 9725 / draft-ietf-wish-whep) that are independent of HTTP handling:
offer validation, trickle-ICE SDP fragments (RFC 8840), ETags and ICE-server ``Link`` headers.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from aiortc import RTCIceCandidate, RTCRtpCodecParameters
from aiortc.codecs import CODECS
from aiortc.rtcpeerconnection import is_codec_compatible
from aiortc.sdp import SessionDescription, candidate_from_sdp

from ..errors import BadSDP, UnsupportedCodec

SDP_TYPE = "application/sdp"
SDPFRAG_TYPE = "application/trickle-ice-sdpfrag"

_SDP_LINE = re.compile(r"^[a-z]=.*$")

MAX_REMOTE_CANDIDATES = 32
"""Per viewer, in its offer and PATCHes together. A browser sends a handful; aioice pairs and
re-sorts its whole check list per candidate and sends checks to every address it is given, so
an unbounded list is both a CPU and a reflection attack."""

# aiortc's parser fails on some malformed SDP in ways other than ValueError: an a=fmtp for a
# payload type with no a=rtpmap raises StopIteration, a section cut short AttributeError. All
# of them are the client's mistake, so all of them are a 400.
_PARSE_ERRORS = (ValueError, KeyError, IndexError, AssertionError, TypeError, AttributeError,
                 StopIteration)


def _parse(sdp: str, what: str) -> SessionDescription:
    if not sdp.startswith("v=0"):
        raise BadSDP(f"the body is not an SDP {what}: it must start with 'v=0'")
    if any(not _SDP_LINE.match(line) for line in sdp.split("\n") if line):
        raise BadSDP("malformed SDP: every line must look like 'x=value'")
    try:
        return SessionDescription.parse(sdp.replace("\n", "\r\n") + "\r\n")
    except _PARSE_ERRORS as exc:
        raise BadSDP(f"malformed SDP {what}: {str(exc) or type(exc).__name__}") from None


def _require_transport(parsed: SessionDescription, what: str) -> None:
    for media in parsed.media:
        if media.dtls is None or not media.dtls.fingerprints:
            raise BadSDP(f"the {what}'s {media.kind} section has no a=fingerprint "
                         "(DTLS is mandatory)")
        if media.ice is None or not media.ice.usernameFragment or not media.ice.password:
            raise BadSDP(f"the {what}'s {media.kind} section has no a=ice-ufrag / a=ice-pwd")


def _require_mids(parsed: SessionDescription) -> None:
    # aiortc pairs transceivers with m-lines by mid; an m-line without one (or a mid used
    # twice) fails half-way through setRemoteDescription and leaves a peer connection that
    # cannot even be closed. Unified Plan requires unique mids anyway (RFC 8843, RFC 9429).
    seen: set[str] = set()
    for index, media in enumerate(parsed.media):
        mid = media.rtp.muxId
        if not mid:
            raise BadSDP(f"the offer's {media.kind} m-line (#{index}) has no a=mid")
        if mid in seen:
            raise BadSDP(f"the offer uses a=mid:{mid} for more than one m-line")
        seen.add(mid)


# What the hub can encode, as aiortc describes it (VP8; H.264 constrained baseline and baseline).
_VIDEO_CODECS = [c for c in CODECS["video"] if c.mimeType.lower() in ("video/vp8", "video/h264")]


def preferred_video_codec(offered: Iterable[RTCRtpCodecParameters]) -> RTCRtpCodecParameters | None:
    """The first codec in the player's own order that the hub can encode, as our codec.

    Browsers list codecs by preference: Chromium and Firefox put VP8 first, Safari H.264. A
    player can reorder with ``RTCRtpTransceiver.setCodecPreferences``.
    """
    for remote in offered:
        for local in _VIDEO_CODECS:
            if is_codec_compatible(local, remote):
                return local
    return None


@dataclass(frozen=True, slots=True)
class Offer:
    sdp: str
    video_codec: RTCRtpCodecParameters
    """Ours, compatible with the player's favourite: what its video m-line will carry."""
    has_audio: bool
    has_data_channel: bool
    ice_ufrag: str
    sends_audio: bool = False
    """The player offers its microphone (audio ``sendrecv``): a controller doing voice chat."""
    dtls_actpass: bool = True
    """Every m-line says ``a=setup:actpass`` (JSEP's offer): the DTLS role is ours to pick."""


def parse_offer(text: str) -> Offer:
    """Check a viewer's offer before aiortc sees it, with errors a person can act on."""
    sdp = text.replace("\r\n", "\n").strip()
    parsed = _parse(sdp, "offer")
    videos = [m for m in parsed.media if m.kind == "video"]
    audios = [m for m in parsed.media if m.kind == "audio"]
    if not videos:
        raise BadSDP("the offer has no video m-line; a WHEP player must offer to receive video")
    if len(videos) > 1 or len(audios) > 1:
        raise BadSDP("the offer must have at most one video and one audio m-line")
    video_codec = preferred_video_codec(videos[0].rtp.codecs)
    if video_codec is None:
        offered = sorted({c.mimeType for c in videos[0].rtp.codecs}) or ["none"]
        raise UnsupportedCodec("the offer accepts neither VP8 nor H.264 (constrained baseline, "
                               f"packetization-mode 1) video (offered: {', '.join(offered)})")
    if audios and not any(c.mimeType.lower() == "audio/opus" for c in audios[0].rtp.codecs):
        raise UnsupportedCodec("the offer's audio m-line does not accept Opus")
    for media in (*videos, *audios):
        if media.direction not in (None, "recvonly", "sendrecv"):
            raise BadSDP(f"the {media.kind} m-line is {media.direction}: a viewer must receive")
    _require_transport(parsed, "offer")
    _require_mids(parsed)
    candidates = [c for m in parsed.media for c in m.ice_candidates]
    if len(candidates) > MAX_REMOTE_CANDIDATES:
        raise BadSDP(f"too many candidates: at most {MAX_REMOTE_CANDIDATES} per viewer")
    for candidate in candidates:
        _check_address(candidate.ip)
    ufrag = next((m.ice.usernameFragment for m in parsed.media if m.ice), None) or ""
    return Offer(
        sdp=sdp.replace("\n", "\r\n") + "\r\n",
        video_codec=video_codec,
        has_audio=bool(audios),
        has_data_channel=any(m.kind == "application" for m in parsed.media),
        ice_ufrag=ufrag,
        sends_audio=bool(audios) and audios[0].direction == "sendrecv",
        dtls_actpass=all(m.dtls is not None and m.dtls.role == "auto" for m in parsed.media),
    )


def parse_answer(text: str) -> str:
    """Check a browser's answer to a gateway offer (seed API); returns it CRLF-normalised."""
    sdp = text.replace("\r\n", "\n").strip()
    _require_transport(_parse(sdp, "answer"), "answer")
    return sdp.replace("\n", "\r\n") + "\r\n"


@dataclass(frozen=True, slots=True)
class SdpFragment:
    ice_ufrag: str | None
    ice_pwd: str | None
    candidates: tuple[RTCIceCandidate, ...]
    end_of_candidates: bool


def parse_sdpfrag(text: str) -> SdpFragment:
    """Parse a trickle-ICE fragment (RFC 8840 section 9)."""
    ufrag = pwd = None
    mid: str | None = None
    mline = -1
    candidates: list[RTCIceCandidate] = []
    end = False
    for raw in text.replace("\r\n", "\n").split("\n"):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("m="):
            mline += 1
            mid = None
        elif line.startswith("a=mid:"):
            mid = line[6:]
        elif line.startswith("a=ice-ufrag:"):
            ufrag = line[12:]
        elif line.startswith("a=ice-pwd:"):
            pwd = line[10:]
        elif line.startswith("a=candidate:"):
            try:
                candidate = candidate_from_sdp(line[12:])
            except (ValueError, IndexError, AssertionError) as exc:
                raise BadSDP(f"malformed candidate line {line!r}: {exc}") from None
            _check_address(candidate.ip)
            candidate.sdpMid = mid
            candidate.sdpMLineIndex = max(mline, 0)
            candidates.append(candidate)
            if len(candidates) > MAX_REMOTE_CANDIDATES:
                raise BadSDP(f"too many candidates: at most {MAX_REMOTE_CANDIDATES} per viewer")
        elif line == "a=end-of-candidates":
            end = True
        elif not _SDP_LINE.match(line):
            raise BadSDP(f"malformed SDP fragment line {line!r}")
    return SdpFragment(ufrag, pwd, tuple(candidates), end)


def _check_address(address: str) -> None:
    """Addresses no peer can be reached at: the gateway sends no connectivity checks there."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        if address.endswith(".local"):
            return  # an mDNS name (browsers hide local addresses so); aioice resolves it
        raise BadSDP(f"candidate address {address!r} is neither an IP address nor an mDNS name") \
            from None
    if ip.is_multicast or ip.is_unspecified or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise BadSDP(f"candidate address {address} is multicast, broadcast or unspecified")


def count_candidates(sdp: str) -> int:
    """Candidates a whole offer carries (non-trickle players put them all in it)."""
    return sum(1 for line in sdp.split("\n") if line.startswith("a=candidate:"))


def browser_ice_servers(urls: Iterable[str], username: str = "",
                        credential: str = "") -> list[dict[str, Any]]:
    """The same servers as :func:`link_headers`, as ``RTCIceServer`` dictionaries for a page's
    ``RTCPeerConnection`` (a player gathers before it POSTs, so it needs them beforehand)."""
    servers: list[dict[str, Any]] = []
    for url in urls:
        server: dict[str, Any] = {"urls": [url]}
        if url.startswith(("turn:", "turns:")) and username:
            server["username"] = username
            server["credential"] = credential
            server["credentialType"] = "password"
        servers.append(server)
    return servers


def link_headers(urls: Iterable[str], username: str = "", credential: str = "") -> list[str]:
    """``Link: <url>; rel="ice-server"`` values (RFC 9725 section 4.6); TURN gets credentials."""
    out = []
    for url in urls:
        value = f'<{url}>; rel="ice-server"'
        if url.startswith(("turn:", "turns:")) and username:
            user = username.replace('"', '\\"')
            cred = credential.replace('"', '\\"')
            value += f'; username="{user}"; credential="{cred}"; credential-type="password"'
        out.append(value)
    return out
